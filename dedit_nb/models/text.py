"""Text conditioning: prompts into the UNet's conditioning, one :class:`EncoderSlot` per tokenizer and text
encoder, and the learned item tokens (:class:`TextConditioner`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class EncoderSlot:
    """One tokenizer + text encoder pair and how its states are read."""

    tokenizer: object
    encoder: torch.nn.Module
    hidden_layer: int = -1          # -1: last hidden state; -2: penultimate (SDXL)
    gives_pooled: bool = False      # SDXL's second encoder also gives the pooled text embedding
    uses_attention_mask: bool = False  # BERT-style encoders want the padding mask; CLIP does not take one

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def embedding(self) -> torch.nn.Embedding:
        return self.encoder.get_input_embeddings()


def byte_level_clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token (the stand-in tokenizer of
    models built from configs, whose prompts are padded to fixed lengths, and of the tiny test models)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _pooled_at_end_of_text(slot: EncoderSlot, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The pooled text embedding, read at each prompt's first end-of-text token and projected.

    Real SD/SDXL text-encoder configs carry the legacy ``eos_token_id: 2``, for which transformers pools at the
    *highest token id* of a prompt; added item tokens have the highest ids, so it would pool at an item token
    instead of the end of the prompt (transformers#24650, diffusers#10754). The tokenizer knows the true id."""
    eos = slot.tokenizer.eos_token_id
    position = (input_ids == eos).int().argmax(-1)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), position]
    projection = getattr(slot.encoder, "text_projection", None)
    return pooled if projection is None else projection(pooled)


class TextConditioner:
    """Turns prompts into the UNet's text conditioning, and owns the learned item tokens."""

    def __init__(self, slots: Sequence[EncoderSlot], added_time_ids: bool = False):
        self.slots = list(slots)
        self.added_time_ids = added_time_ids
        self.learned: set[str] = set()   # item tokens (added by add_tokens): never cut from a prompt

    @property
    def max_length(self) -> int:
        return min(s.max_length for s in self.slots)

    # --- item tokens ---------------------------------------------------------------------------------
    def add_tokens(self, tokens: Sequence[str], generator: torch.Generator | None = None,
                   restart: bool = False) -> list[str]:
        """Add new tokens to every tokenizer; their embedding rows start as draws from a normal with the mean
        and std of the tokenizer's own vocabulary. Tokens already present keep their rows, unless ``restart``
        (a finetune starting over draws them again). Returns the ones added."""
        self.learned.update(tokens)
        fresh = [t for t in tokens if t not in self.slots[0].tokenizer.get_vocab()]
        drawn = list(tokens) if restart else fresh
        for slot in self.slots:
            if fresh:
                slot.tokenizer.add_tokens(fresh)
            ids = slot.tokenizer.convert_tokens_to_ids(drawn)
            if not ids:
                continue
            table = slot.embedding().weight
            base = table[:slot.tokenizer.vocab_size].float()   # other sessions' tokens do not shift the draw
            mean, std = base.mean().item(), base.std().item()
            if max(ids) >= table.shape[0]:  # grow only: some tables have spare rows past the tokenizer
                slot.encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            with torch.no_grad():
                rows = torch.randn(len(drawn), table.shape[1], generator=generator) * std + mean
                slot.embedding().weight[ids] = rows.to(slot.embedding().weight)
        return fresh

    @contextlib.contextmanager
    def trainable_rows(self, tokens: Sequence[str], rows: dict[str, torch.Tensor] | None = None):
        """Train the tokens' embedding rows as fp32 master copies, whatever the encoders' dtype.

        Yields one ``(len(tokens), D)`` fp32 leaf tensor per encoder (started from ``rows``, keyed as in
        :meth:`get_token_rows`, or from the table). A forward hook puts them, cast to the table's dtype, in
        place of the table's rows, so gradients reach only them (an optimizer over them holds kilobytes,
        not the whole vocabulary). On exit the table takes their values.
        """
        start = rows if rows is not None else self.get_token_rows(tokens)
        masters, hooks = [], []
        try:
            for s, (slot, ids) in enumerate(zip(self.slots, self.token_ids(tokens))):
                module = slot.embedding()
                device = module.weight.device
                master = torch.stack([start[f"{s}/{t}"] for t in tokens]).float().to(device).requires_grad_(True)
                position = torch.full((module.weight.shape[0],), -1, dtype=torch.long, device=device)
                position[ids.to(device)] = torch.arange(len(tokens), device=device)
                masters.append(master)
                hooks.append(module.register_forward_hook(_substitute_rows(master, position)))
            yield masters
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for slot, ids, master in zip(self.slots, self.token_ids(tokens), masters):
                    weight = slot.embedding().weight
                    weight[ids.to(weight.device)] = master.detach().to(weight)

    def token_ids(self, tokens: Sequence[str]) -> list[torch.Tensor]:
        """Row indices of the tokens in each encoder's embedding table."""
        out = []
        for slot in self.slots:
            ids = slot.tokenizer.convert_tokens_to_ids(list(tokens))
            unk = getattr(slot.tokenizer, "unk_token_id", None)
            missing = [t for t, i in zip(tokens, ids) if i is None or i == unk]
            if missing:
                raise KeyError(f"tokens {missing} are not in the tokenizer; add them with add_tokens first")
            out.append(torch.tensor(ids, dtype=torch.long))
        return out

    def get_token_rows(self, tokens: Sequence[str]) -> dict[str, torch.Tensor]:
        """The embedding rows of the tokens, keyed ``"{slot}/{token}"`` (what a session stores)."""
        rows = {}
        for s, (slot, ids) in enumerate(zip(self.slots, self.token_ids(tokens))):
            weight = slot.embedding().weight.detach()
            for t, i in zip(tokens, ids.tolist()):
                rows[f"{s}/{t}"] = weight[i].float().cpu().clone()
        return rows

    def set_token_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """Load learned rows (adding the tokens when missing)."""
        tokens = sorted({k.split("/", 1)[1] for k in rows})
        self.add_tokens(tokens)
        with torch.no_grad():
            for s, (slot, ids) in enumerate(zip(self.slots, self.token_ids(tokens))):
                weight = slot.embedding().weight
                for t, i in zip(tokens, ids.tolist()):
                    key = f"{s}/{t}"
                    if key not in rows:
                        raise KeyError(f"learned weights lack {key!r}; they were saved for another model family")
                    weight[i] = rows[key].to(weight)

    # --- encoding ------------------------------------------------------------------------------------
    def fit(self, prompt: str, length: int) -> tuple[str, str, list[str]]:
        """How ``prompt`` fits in ``length`` tokens (start and end tokens included): ``(the text encoded,
        the words dropped, the item tokens among them)``; ``(prompt, "", [])`` when it all fits."""
        kept, dropped_text, dropped_items = prompt, "", []
        for s, slot in enumerate(self.slots):
            ids = slot.tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
            if len(ids) > length:
                cut = ids[length - 1:-1]   # truncation keeps the end token and drops what precedes it
                if s == 0:
                    kept = slot.tokenizer.decode(ids[1:length - 1]).strip()
                text = slot.tokenizer.decode(cut).strip()
                dropped_text = text if len(text) > len(dropped_text) else dropped_text
                items = [t for t in slot.tokenizer.convert_ids_to_tokens(cut) if t in self.learned]
                dropped_items += [t for t in items if t not in dropped_items]
        return kept, dropped_text, dropped_items

    def encode(self, prompts: Sequence[str], length: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts padded/truncated to ``length`` tokens (callers check truncation with :meth:`fit`).

        Returns states ``(n, length, D)`` and the pooled embedding ``(n, P)`` (SDXL) or None, in the
        encoders' dtype.
        """
        length = min(length or self.max_length, self.max_length)
        states, pooled = [], None
        for slot in self.slots:
            device = slot.embedding().weight.device
            batch = slot.tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                                   return_tensors="pt")
            kwargs = {"output_hidden_states": slot.hidden_layer != -1}
            if slot.uses_attention_mask:
                kwargs["attention_mask"] = batch.attention_mask.to(device)
            out = slot.encoder(batch.input_ids.to(device), **kwargs)
            hidden = out.last_hidden_state if slot.hidden_layer == -1 else out.hidden_states[slot.hidden_layer]
            states.append(hidden)
            if slot.gives_pooled:
                pooled = _pooled_at_end_of_text(slot, out.last_hidden_state, batch.input_ids.to(device))
        return torch.cat(states, dim=-1), pooled

    def added_cond_kwargs(self, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
        """SDXL's extra conditioning: pooled text embedding and (original size, crop, target size)."""
        if not self.added_time_ids:
            return None
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}



def _substitute_rows(master: torch.Tensor, position: torch.Tensor):
    """Forward hook of an embedding: rows whose id has a master row take it (cast to the output's dtype)."""
    def hook(module, args, output):
        where = position[args[0]]
        found = where >= 0
        if not bool(found.any()):
            return output
        return torch.where(found[..., None], master[where.clamp_min(0)].to(output.dtype), output)
    return hook
