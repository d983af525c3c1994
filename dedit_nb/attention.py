"""Grouped cross-attention: every pixel attends only to its own item's prompt.

The UNet is given one long text sequence per image: the encoded prompts of all its items, one after
another. An :class:`ItemLayout` says, for every batch element, which item owns each latent pixel and which
span of that sequence is each item's prompt. :class:`GroupedAttnProcessor` is a diffusers attention
processor (installed with ``unet.set_attn_processor``) that reads the layout from
``cross_attention_kwargs={"item_layout": layout}``; without a layout, and in self-attention, it is plain
scaled-dot-product attention, identical to diffusers' ``AttnProcessor2_0``.

Cost: pixels are sorted by item once per layer resolution, and each item's pixels run one attention against
that item's keys only, so the work is sum_k N_k * L_k = N * L, the same as a single ungrouped attention,
whatever the number of items. (The reference code computes K full attentions and masks them.) A batch of
many distinct layouts (a training batch of different scenes) would pay one call per item of every element,
so it runs one attention over all keys with a mask instead: the same result, more arithmetic, no loop.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


Span = tuple[int, int]


@dataclass
class _Plan:
    """Per layer resolution: for each group of batch elements that share a layout, the pixel order that
    sorts pixels by item, and each present item's pixel count and key span."""

    groups: list[tuple[torch.Tensor | None, torch.Tensor, list[int], list[Span]]]


def level_factor(height: int, width: int, num_tokens: int) -> int:
    """The downscale (a power of two) of the UNet level with ``num_tokens`` pixels over a ``height x width``
    latent. Levels are ceil-sized, as the UNet's stride-2 convolutions make them (25 -> 13 -> 7 -> 4)."""
    factor = 1
    while True:
        cells = -(-height // factor) * -(-width // factor)
        if cells == num_tokens:
            return factor
        if cells < num_tokens or cells == 1:
            raise ValueError(
                f"a cross-attention layer has {num_tokens} pixels, which is no level of the {width}x{height} "
                f"latent (sides halved, rounding up); image sides must be multiples of the model's latent factor")
        factor *= 2


def item_coverage(labels: torch.Tensor, num_items: int, num_tokens: int) -> torch.Tensor:
    """``(B, num_items, h, w)``: the share of each cell of a layer with ``num_tokens`` pixels that each item of
    the ``(B, H, W)`` label maps covers. Cell ``(i, j)`` of a level ``f`` times coarser is the block
    ``[i*f, (i+1)*f) x [j*f, (j+1)*f)``; the blocks of the last row and column may be cut short."""
    factor = level_factor(int(labels.shape[1]), int(labels.shape[2]), num_tokens)
    onehot = F.one_hot(labels.long(), num_items).permute(0, 3, 1, 2).float()
    return onehot if factor == 1 else F.avg_pool2d(onehot, factor, ceil_mode=True)


@dataclass
class ItemLayout:
    """Which item owns each latent pixel, and where each item's prompt sits in the text sequence.

    labels: ``(B, H, W)`` integer item index per latent pixel, for each batch element.
    spans: for each batch element, a list over items of ``(start, end)`` token ranges into
        ``encoder_hidden_states``; item ``k`` of element ``b`` attends to keys ``spans[b][k]`` only.
    adapters, slots: per-item adapters (:class:`dedit_nb.models.adapters.ItemAdapters`) and, for each batch
        element, the adapter slot of each item (``-1``: none); item ``k``'s slot acts on its pixels' queries
        and its span's keys and values.
    """

    labels: torch.Tensor
    spans: Sequence[Sequence[Span]]
    adapters: object = None
    slots: Sequence[Sequence[int]] | None = None
    _plans: dict = field(default_factory=dict, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)
    _groups: list = field(default_factory=list, repr=False)
    _slot_maps: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.labels.ndim != 3:
            raise ValueError(f"ItemLayout.labels must be (B, H, W), got {tuple(self.labels.shape)}")
        if len(self.spans) != self.labels.shape[0]:
            raise ValueError(f"ItemLayout has {self.labels.shape[0]} label maps but {len(self.spans)} span lists")
        self.labels = self.labels.long()
        for b, spans in enumerate(self.spans):
            top = int(self.labels[b].max())
            if int(self.labels[b].min()) < 0 or top >= len(spans):
                raise ValueError(f"batch element {b}: labels reach item {top} but only {len(spans)} prompt spans given")
        if (self.adapters is None) != (self.slots is None):
            raise ValueError("ItemLayout takes per-item adapters and their slots together, or neither")
        if self.slots is not None and [len(s) for s in self.slots] != [len(s) for s in self.spans]:
            raise ValueError("ItemLayout.slots must give one adapter slot per item of every batch element")
        # Batch elements with the same label map and spans (e.g. repeated samples) share one plan.
        keys: dict = {}
        for b in range(self.labels.shape[0]):
            key = (tuple(map(tuple, self.spans[b])), self.labels[b].cpu().numpy().tobytes())
            keys.setdefault(key, []).append(b)
        self._groups = list(keys.values())

    @property
    def num_layouts(self) -> int:
        """How many distinct (label map, spans) pairs the batch holds."""
        return len(self._groups)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[1]), int(self.labels.shape[2])

    def level_labels(self, num_tokens: int) -> torch.Tensor:
        """Label maps at the resolution of a layer with ``num_tokens`` pixels: each cell takes the item that
        covers most of its block (so every cell keeps exactly one item)."""
        h, w = self.shape
        if h * w == num_tokens:
            return self.labels
        return item_coverage(self.labels, max(len(s) for s in self.spans), num_tokens).argmax(dim=1)

    def key_mask(self, num_tokens: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """``(B, 1, N, S)`` boolean mask: pixel ``n`` of element ``b`` may attend to key ``s``."""
        cached = self._masks.get((num_tokens, num_keys, device))
        if cached is not None:
            return cached
        owner = torch.full((self.labels.shape[0], num_keys), -1, dtype=torch.long)
        for b, spans in enumerate(self.spans):
            for k, (s, e) in enumerate(spans):
                if e > num_keys:
                    raise ValueError(f"batch element {b}: item {k}'s prompt span ends at token {e}, "
                                     f"past the {num_keys} tokens of encoder_hidden_states")
                owner[b, s:e] = k
        labels = self.level_labels(num_tokens).reshape(self.labels.shape[0], -1)
        mask = (labels[:, :, None] == owner[:, None, :]).unsqueeze(1).to(device)
        self._masks[(num_tokens, num_keys, device)] = mask
        return mask

    def pixel_slots(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """``(B, N)``: the adapter slot of each pixel of a layer with ``num_tokens`` pixels (its item's)."""
        key = ("pixels", num_tokens, device)
        if key not in self._slot_maps:
            table = self._slot_table()
            labels = self.level_labels(num_tokens).reshape(self.labels.shape[0], -1)
            self._slot_maps[key] = torch.gather(table.to(labels.device), 1, labels).to(device)
        return self._slot_maps[key]

    def token_slots(self, num_keys: int, device: torch.device) -> torch.Tensor:
        """``(B, S)``: the adapter slot of each key (its item's; ``-1`` for padding)."""
        key = ("tokens", num_keys, device)
        if key not in self._slot_maps:
            owner = torch.full((self.labels.shape[0], num_keys), -1, dtype=torch.long)
            for b, (spans, slots) in enumerate(zip(self.spans, self._slot_table().tolist())):
                for (s, e), slot in zip(spans, slots):
                    owner[b, s:e] = slot
            self._slot_maps[key] = owner.to(device)
        return self._slot_maps[key]

    def _slot_table(self) -> torch.Tensor:
        width = max(len(s) for s in self.spans)
        return torch.tensor([list(s) + [-1] * (width - len(s)) for s in self.slots], dtype=torch.long)

    def plan(self, num_tokens: int, device: torch.device) -> _Plan:
        cached = self._plans.get((num_tokens, device))
        if cached is not None:
            return cached
        labels = self.level_labels(num_tokens).reshape(self.labels.shape[0], -1).to(device)
        groups = []
        for members in self._groups:
            flat = labels[members[0]]
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=len(self.spans[members[0]])).tolist()
            batch_index = None if len(members) == labels.shape[0] else torch.tensor(members, device=device)
            groups.append((batch_index, order, counts, list(self.spans[members[0]])))
        plan = _Plan(groups)
        self._plans[(num_tokens, device)] = plan
        return plan


# Above this many distinct layouts in a batch, one masked attention beats a loop over every element's items.
# Sampling with guidance has two (conditional and unconditional), so it stays on the sorted path.
MASKED_ABOVE_LAYOUTS = 2


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: ItemLayout,
                      masked_above_layouts: int = MASKED_ABOVE_LAYOUTS) -> torch.Tensor:
    """Attention where each query pixel sees only its item's keys.

    query: ``(B, heads, N, d)``; key, value: ``(B, heads, S, d)``. Returns ``(B, heads, N, d)``. A batch with
    more than ``masked_above_layouts`` distinct layouts runs :func:`masked_grouped_attention`, others
    :func:`sorted_grouped_attention`.
    """
    batch, _, num_tokens, _ = query.shape
    if batch != layout.labels.shape[0]:
        raise ValueError(f"attention batch {batch} does not match the item layout's batch {layout.labels.shape[0]}")
    if layout.num_layouts > masked_above_layouts:
        return masked_grouped_attention(query, key, value, layout)
    return sorted_grouped_attention(query, key, value, layout)


def masked_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: ItemLayout
                             ) -> torch.Tensor:
    """:func:`grouped_attention` as one attention over all keys, masked to each pixel's item."""
    mask = layout.key_mask(query.shape[2], key.shape[2], query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def sorted_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: ItemLayout
                             ) -> torch.Tensor:
    """:func:`grouped_attention` with pixels sorted by item, one attention per item and distinct layout."""
    plan = layout.plan(query.shape[2], query.device)
    out = torch.zeros_like(query)
    for batch_index, order, counts, spans in plan.groups:
        q = query if batch_index is None else query.index_select(0, batch_index)
        k = key if batch_index is None else key.index_select(0, batch_index)
        v = value if batch_index is None else value.index_select(0, batch_index)
        q_sorted = q.index_select(2, order)
        pieces, start = [], 0
        for count, (s, e) in zip(counts, spans):
            if count:  # items too small to reach this resolution own no pixels here
                pieces.append(F.scaled_dot_product_attention(
                    q_sorted[:, :, start:start + count], k[:, :, s:e], v[:, :, s:e]))
            start += count
        grouped = torch.empty_like(q)
        grouped.index_copy_(2, order, torch.cat(pieces, dim=2))
        if batch_index is None:
            out = grouped
        else:
            out.index_copy_(0, batch_index, grouped)
    return out


class GroupedAttnProcessor:
    """Diffusers attention processor for D-Edit.

    Cross-attention with an ``item_layout`` in ``cross_attention_kwargs`` is grouped by item; everything else
    (self-attention, or no layout) is standard scaled-dot-product attention. Install on all layers with
    ``unet.set_attn_processor(GroupedAttnProcessor())``. ``masked_above_layouts``: see
    :func:`grouped_attention`.
    """

    def __init__(self, masked_above_layouts: int = MASKED_ABOVE_LAYOUTS):
        self.masked_above_layouts = masked_above_layouts

    def grouped(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: ItemLayout
                ) -> torch.Tensor:
        """The grouped cross-attention itself (``(B, heads, N, d)`` projections in, ``(B, heads, N, d)`` out);
        subclasses that need the attention weights override this."""
        return grouped_attention(query, key, value, layout, self.masked_above_layouts)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 item_layout: ItemLayout | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if is_cross and item_layout is not None and item_layout.adapters is not None:
            query, key, value = item_layout.adapters.route(attn, hidden_states, encoder_hidden_states,
                                                           query, key, value, item_layout)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross and item_layout is not None:
            if attention_mask is not None:
                raise ValueError("grouped cross-attention takes no attention_mask: item spans select the keys")
            hidden_states = self.grouped(query, key, value, item_layout)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if is_cross and item_layout is not None and item_layout.adapters is not None:
            hidden_states = item_layout.adapters.route_out(attn, hidden_states, item_layout)
        else:
            hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _QuietAboutItemLayout(logging.Filter):
    """diffusers warns, on every call, that a processor without an ``item_layout`` parameter ignores it; the
    self-attention layers keep the user's processor, and ignoring the layout is what they should do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "['item_layout'] are not expected" not in record.getMessage()


def cross_attention_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's cross-attention modules with their names (the set is fixed once the UNet is built; LoRA
    wraps their projections, not them)."""
    return [(name, m) for name, m in unet.named_modules() if getattr(m, "is_cross_attention", False)]


@functools.lru_cache(maxsize=None)
def _takes_item_layout(processor_class: type) -> bool:
    return "item_layout" in inspect.signature(processor_class.__call__).parameters   # diffusers' own test


def layers_ignoring_item_layout(layers: Sequence[tuple[str, torch.nn.Module]]) -> list[str]:
    """Of ``layers`` (:func:`cross_attention_layers`), those whose processor would drop ``item_layout``:
    diffusers hands a processor only the keywords its ``__call__`` names, so after ``set_attn_processor`` or
    ``enable_xformers_memory_efficient_attention`` replaced the grouped processors, every pixel would see every
    item's prompt without a word (the warning is silenced for the self-attention layers' sake)."""
    return [name for name, module in layers if not _takes_item_layout(type(module.processor))]


def install_grouped_attention(unet) -> None:
    """Put :class:`GroupedAttnProcessor` on every cross-attention layer of a diffusers UNet; self-attention
    layers keep the processor they have (diffusers' default, or a flash / xformers one the user chose)."""
    processors = dict(unet.attn_processors)
    for name, _ in cross_attention_layers(unet):
        if f"{name}.processor" in processors:
            processors[f"{name}.processor"] = GroupedAttnProcessor()
    unet.set_attn_processor(processors)
    quiet = logging.getLogger("diffusers.models.attention_processor")
    if not any(isinstance(f, _QuietAboutItemLayout) for f in quiet.filters):
        quiet.addFilter(_QuietAboutItemLayout())
