"""The learned UNet delta: the parameters a finetune's stage 2 trained, in place on the UNet or not.

One owner for the modes: ``'attn'`` replaces the q/k/v weights of the cross-attention layers (the loaded
values are kept on the CPU to restore them), ``'lora'`` adds a peft LoRA adapter (unloaded to restore),
``'per_item'`` leaves the UNet as loaded and holds each item's adapter (:mod:`.adapters`), which the item
layouts route.
"""
from __future__ import annotations

import torch

from .adapters import PER_ITEM_MODE, ItemAdapters

LORA_ADAPTER = "dedit"


class UNetDelta:
    """Puts a session's learned UNet parameters in place on ``unet`` and takes them off, bit for bit."""

    def __init__(self, unet):
        self.unet = unet
        self._pristine: dict[str, torch.Tensor] = {}   # UNet parameters as loaded, before a delta replaced them
        self.lora_adapter: str | None = None
        self.item_adapters: ItemAdapters | None = None  # a per-item session's adapters (the UNet stays as loaded)
        self._delta_source: dict | None = None          # the session tensors whose delta is in place now

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def cross_attention_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The q/k/v projections of every cross-attention layer (what stage 2 trains without LoRA)."""
        return {n: p for n, p in self.unet.named_parameters()
                if ".attn2.to_q." in n or ".attn2.to_k." in n or ".attn2.to_v." in n}

    def remember_pristine(self, names) -> None:
        """Keep the loaded values of these parameters, on the CPU (they are only read back by reset_unet,
        and on the GPU they would hold every edit's memory up by their size: 0.79 GiB on SDXL)."""
        params = dict(self.unet.named_parameters())
        for n in names:
            if n not in self._pristine:
                self._pristine[n] = params[n].detach().to("cpu", copy=True)

    def add_lora(self, rank: int, alpha: float, target_modules: list[str], seed: int = 0) -> None:
        """A fresh LoRA adapter; its random init is drawn from ``seed`` (not from the global generator, whose
        state depends on what ran before: a resumed finetune would start from another init)."""
        from peft import LoraConfig
        self.reset_unet()
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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
                params[n].data = value.to(params[n].device, copy=True)
        self._pristine.clear()
        self.item_adapters = None
        self._delta_source = None

    def load_unet_delta(self, mode: str, tensors: dict[str, torch.Tensor], lora: dict | None = None) -> None:
        """Put learned UNet parameters in place ('attn': replaced q/k/v weights; 'lora': adapter weights)."""
        self.reset_unet()
        if not tensors:
            return
        if mode == PER_ITEM_MODE:
            self.item_adapters = ItemAdapters.from_saved(self.unet, tensors, lora["rank"], lora["alpha"])
            self._delta_source = tensors
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
        device = self.device
        with torch.no_grad():
            for n, value in tensors.items():
                params[n].data = value.to(device=device, dtype=params[n].dtype).clone()
        self.unet.requires_grad_(False)
        self._delta_source = tensors

    def use_session(self, session) -> None:
        """Put exactly this finetuned session's UNet delta in place, swapped only when another one is in place."""
        unet = session.load_weights("unet")
        if unet is not self._delta_source or not unet:
            meta = session.weights_meta
            self.load_unet_delta(meta["mode"], unet, meta.get("lora"))
