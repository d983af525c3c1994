"""Stage 2 in per-item mode (``FinetuneConfig(per_item=True)``): one small LoRA per item on the q/k/v of the
cross-attention layers, routed by the item map (:mod:`dedit_nb.models.adapters`), in place of one delta
shared by all items. Each item's adapter is saved under its first token's name, so it can leave the session
alone (:mod:`dedit_nb.bank`)."""
from __future__ import annotations

import dataclasses

import torch

from .. import conditioning as C
from ..models.adapters import PER_ITEM_MODE, ItemAdapters, model_identity
from .loop import _Run


class PerItemStage:
    """The per-item adapters of a finetune's items (every image of every joint session), ``parameters`` for
    the shared stage-2 loop, and the saved tensors split per item (``"{first token}/{layer}.{proj}.lora_A"``)."""

    def __init__(self, run: _Run, saved_unet: dict[str, torch.Tensor]):
        config, unet = run.config, run.model.unet
        self.keys = [it.tokens[0] for s in run.sessions for e in s.images for it in e.items]
        self.adapters = ItemAdapters.fresh(unet, self.keys, config.lora_rank, float(config.lora_rank),
                                           torch.Generator().manual_seed(config.seed))
        self.parameters = self.adapters.tensors
        self.stacked_saved = {}
        if saved_unet:   # a resumed stage 2: each item's saved slices back into their slots
            self.stacked_saved = {name: torch.stack([saved_unet[f"{k}/{name}"] for k in self.keys])
                                  for name in self.parameters}
        run.meta.update(mode=PER_ITEM_MODE, lora={"rank": config.lora_rank, "alpha": float(config.lora_rank)},
                        base=model_identity(run.model))

    def route(self, conds: list[C.Conditioning]) -> list[C.Conditioning]:
        """Each image's conditioning with its items' slots (the images' items in order, as ``keys``)."""
        routed, offset = [], 0
        for cond in conds:
            slots = list(range(offset, offset + len(cond.spans)))
            routed.append(dataclasses.replace(cond, slots=slots, adapters=self.adapters))
            offset += len(cond.spans)
        return routed

    def saved(self) -> dict[str, torch.Tensor]:
        return {f"{key}/{name}": value[m].detach() for name, value in self.parameters.items()
                for m, key in enumerate(self.keys)}
