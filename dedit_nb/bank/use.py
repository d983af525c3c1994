"""Bank items in edits: the source of an image or add operation can be a bank file (or the name of one of the
session's imported bank items). The receiving session needs no training: the item's tokens join the text
encoders, and its adapter joins the per-item routing, acting at its pixels and tokens only; the session's own
items keep what they have (their per-item adapters, or the session's shared delta, which the banked item's
pixels do not see: they start from the base weights its adapter was trained on)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..attention import cross_attention_layers
from ..models.adapters import PER_ITEM_MODE, PROJECTIONS, ItemAdapters, _linear, split_by_item
from ..session import Session
from ..session.bank import check_base
from . import files


def source_item(session: Session, ref: str | os.PathLike) -> files.BankItem:
    """A bank item by the name it has among ``session``'s bank items, or by the path of a bank file."""
    if isinstance(ref, str) and ref in {e["name"] for e in session.bank_items}:
        return session.bank_item(ref)
    return files.read(Path(ref))


def base_projections(model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The loaded q/k/v (and output) weights of the cross-attention layers that a shared delta in place replaced
    (attention mode: kept by the model's delta; LoRA mode: the wrapped layers), on the model's device: what a
    banked item's positions project with. Empty when the UNet is as loaded. (A shared LoRA on the
    self-attention layers still acts on a banked item's pixels there: only cross-attention is routed.)"""
    pristine, base = model.delta._pristine, {}
    for name, module in cross_attention_layers(model.unet):
        for proj, layer in [(p, getattr(module, p)) for p in PROJECTIONS] + [("to_out.0", module.to_out[0])]:
            key = f"{name}.{proj}"
            lora_on = layer is not _linear(layer) and not layer.disable_adapters   # loaded adapters may be off
            if f"{key}.weight" in pristine or lora_on:
                linear = _linear(layer)
                weight = pristine.get(f"{key}.weight", linear.weight)
                bias = pristine.get(f"{key}.bias", linear.bias)
                device, dtype = linear.weight.device, linear.weight.dtype
                base[key] = (weight.to(device, dtype), None if bias is None else bias.to(device, dtype))
    return base


def bank_adapters(model, session: Session, items: list[files.BankItem]) -> ItemAdapters:
    """Put banked ``items`` into ``model`` for one edit of ``session`` (whose weights are in place): each is
    checked against the model's identity, its token rows are set, and its adapter is stacked with the session's
    own per-item adapters (if it has them)."""
    slots = {}
    meta = session.weights_meta
    if meta.get("mode") == PER_ITEM_MODE:
        lora = meta["lora"]
        slots = {key: (tensors, lora["rank"], lora["alpha"])
                 for key, tensors in split_by_item(session.load_weights("unet")).items()}
    for item in items:
        check_base(item, model)
        model.conditioner.set_token_rows(item.rows)
        slots[item.key] = (item.adapter, item.rank, item.alpha)
    return ItemAdapters.combine(model.unet, slots, base_projections(model))
