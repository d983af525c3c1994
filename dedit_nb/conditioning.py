"""Item prompts -> the UNet's grouped text conditioning (shared by finetuning and sampling)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from . import masks as M
from .attention import ItemLayout, Span

if TYPE_CHECKING:
    from .models import DEditModel

ITEM_PROMPT_LENGTH = 40   # item prompts, as in the reference
TEXT_PROMPT_LENGTH = 77   # free text prompts (text edits)


class PromptTooLongError(ValueError):
    """A prompt whose learned item tokens would be cut off by the encoder's length limit."""


@dataclass
class Conditioning:
    """One image's prompts end to end: states ``(1, S, D)``, each item's span, the pooled embedding, and
    what each prompt became once fitted to its length (``encoded``; the words cut off in ``dropped``), and,
    with per-item adapters, each item's adapter ``slots`` (``-1``: none) into ``adapters``."""

    states: torch.Tensor
    spans: list[Span]
    pooled: torch.Tensor | None
    encoded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    slots: list[int] | None = None
    adapters: object = None


def fit_prompts(model: DEditModel, prompts: Sequence[str], lengths: Sequence[int], names: Sequence[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """Each prompt as it will be encoded at its length, and the words that do not fit.

    A prompt whose item tokens would not fit is refused (an item's learned tokens are never dropped); other
    words past the limit are dropped with a warning naming them, as diffusers' pipelines do.
    """
    encoded, dropped = [], []
    for k, (prompt, length) in enumerate(zip(prompts, lengths)):
        length = min(length, model.conditioner.max_length)
        kept, lost_words, lost_items = model.conditioner.fit(prompt, length)
        name = names[k] if names is not None else f"#{k}"
        if lost_items:
            raise PromptTooLongError(
                f"item {name!r}: the prompt {prompt!r} is longer than the {length} tokens an item prompt may "
                f"have, and its learned tokens {lost_items} would be cut off; shorten its template (or use "
                f"fewer num_tokens, or a larger item_prompt_length when finetuning)")
        if lost_words:
            warnings.warn(f"the prompt of item {name!r} is longer than the encoder's {length} tokens; "
                          f"dropped: {lost_words!r}", stacklevel=3)
        encoded.append(kept)
        dropped.append(lost_words)
    return encoded, dropped


def encode_items(model: DEditModel, prompts: Sequence[str], lengths: Sequence[int],
                 areas: Sequence[float] | None = None, names: Sequence[str] | None = None) -> Conditioning:
    """Encode one prompt per item (``lengths[k]`` tokens each) into one sequence.

    The pooled embedding (SDXL) is the area-weighted mean of the items' pooled embeddings. ``names`` (the
    items' labels) name the item in the error or warning of a prompt that does not fit (:func:`fit_prompts`).
    """
    encoded, dropped = fit_prompts(model, prompts, lengths, names)
    pieces, pooled_rows, spans, start = [], [], [], 0
    by_length: dict[int, list[int]] = {}
    for k, length in enumerate(lengths):
        by_length.setdefault(min(length, model.conditioner.max_length), []).append(k)
    encoded_states: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for length, ks in by_length.items():
        states, pooled = model.conditioner.encode([prompts[k] for k in ks], length)
        for j, k in enumerate(ks):
            encoded_states[k] = (states[j], None if pooled is None else pooled[j])
    for k in range(len(prompts)):
        states, pooled = encoded_states[k]
        pieces.append(states)
        spans.append((start, start + states.shape[0]))
        start += states.shape[0]
        if pooled is not None:
            pooled_rows.append(pooled)
    pooled = None
    if pooled_rows:
        weights = torch.tensor(areas if areas is not None else [1.0] * len(prompts), dtype=pooled_rows[0].dtype,
                               device=pooled_rows[0].device)
        weights = weights / weights.sum().clamp_min(1e-8)
        pooled = (torch.stack(pooled_rows) * weights[:, None]).sum(0, keepdim=True)
    return Conditioning(torch.cat(pieces, dim=0)[None], spans, pooled, encoded, dropped)


def unconditional(model: DEditModel, length: int = TEXT_PROMPT_LENGTH) -> Conditioning:
    """The classifier-free guidance branch: the empty prompt over the whole image (zeros for models
    trained that way, e.g. SDXL's ``force_zeros_for_empty_prompt``)."""
    states, pooled = model.conditioner.encode([""], length)
    if model.zero_uncond:
        states = torch.zeros_like(states)
        pooled = None if pooled is None else torch.zeros_like(pooled)
    return Conditioning(states, [(0, states.shape[1])], pooled)


def latent_labels(model: DEditModel, labels: np.ndarray, num_items: int) -> torch.Tensor:
    """A pixel label map at latent resolution (majority of each VAE block)."""
    if model.vae_scale == 1:
        small = labels
    else:
        small = M.downsample_labels_majority(labels, model.vae_scale, num_items)
    return torch.as_tensor(np.ascontiguousarray(small), dtype=torch.long)


def batch(conds: Sequence[Conditioning], labels: Sequence[torch.Tensor]
          ) -> tuple[torch.Tensor, ItemLayout, torch.Tensor | None]:
    """Stack several images' conditionings (padded with unused zero keys) and their item layout."""
    length = max(c.states.shape[1] for c in conds)
    states = torch.cat([torch.nn.functional.pad(c.states, (0, 0, 0, length - c.states.shape[1])) for c in conds])
    adapters = next((c.adapters for c in conds if c.adapters is not None), None)
    if any(c.adapters not in (None, adapters) for c in conds):
        raise ValueError("the conditionings of one batch route their items through different per-item adapters")
    slots = None if adapters is None else [c.slots if c.adapters is not None else [-1] * len(c.spans)
                                           for c in conds]
    layout = ItemLayout(torch.stack([l.to(states.device) for l in labels]), [c.spans for c in conds],
                        adapters, slots)
    pooled = None
    if conds[0].pooled is not None:
        pooled = torch.cat([c.pooled for c in conds])
    return states, layout, pooled
