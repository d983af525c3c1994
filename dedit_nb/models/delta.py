"""The learned UNet delta: the parameters a finetune's stage 2 trained, in place on the UNet or not.

One owner for the modes: ``'attn'`` replaces the q/k/v weights of the cross-attention layers (the loaded
values are kept on the CPU to restore them); ``'lora'`` gives each session its own peft adapter, named after
the session and switched with diffusers' ``set_adapter``, so swapping back to a session whose adapter is still
loaded copies nothing. At most :data:`MAX_SESSION_ADAPTERS` stay loaded, the least recently used deleted
beyond that (an adapter is 3 MiB at rank 4 on SD 1.5, 22 MiB on SDXL). An attention-mode session needs the
UNet's own parameter names, so putting one in place unloads every adapter. ``'per_item'`` leaves the UNet as
loaded and holds each item's adapter (:mod:`.adapters`), which the item layouts route.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from .adapters import PER_ITEM_MODE, ItemAdapters

if TYPE_CHECKING:
    from ..session import Session

LORA_ADAPTER = "dedit"    # the adapter a finetune trains, and the adapter name in the parameter names sessions save
MAX_SESSION_ADAPTERS = 4


def session_adapter(session_id: str) -> str:
    """The name of a session's LoRA adapter on a shared UNet."""
    return f"session_{session_id}"


class UNetDelta:
    """Puts a session's learned UNet parameters in place on ``unet`` and takes them off, bit for bit."""

    def __init__(self, unet):
        self.unet = unet
        self._pristine: dict[str, torch.Tensor] = {}   # UNet parameters as loaded, before a delta replaced them
        # LoRA adapters on the UNet, least recently used first -> the session tensors each holds (None: the
        # adapter a finetune trains, which holds no saved session's weights)
        self.adapters: OrderedDict[str, dict | None] = OrderedDict()
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
        """A fresh LoRA adapter to train (:data:`LORA_ADAPTER`), on the UNet as loaded; its random init is drawn
        from ``seed`` (not from the global generator, whose state depends on what ran before: a resumed
        finetune would start from another init)."""
        self.reset_unet()
        self._add_adapter(LORA_ADAPTER, rank, alpha, target_modules, seed)
        self.adapters[LORA_ADAPTER] = None

    def _add_adapter(self, name: str, rank: int, alpha: float, target_modules: list[str], seed: int) -> None:
        from peft import LoraConfig
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")   # several adapters: by design
            torch.manual_seed(seed)
            self.unet.add_adapter(config, adapter_name=name)
        for p in self.lora_parameters(name).values():   # trained in fp32 (peft casts the input to them)
            p.data = p.data.float()

    def lora_parameters(self, adapter: str = LORA_ADAPTER) -> dict[str, torch.nn.Parameter]:
        """One adapter's parameters, named as sessions save them: with :data:`LORA_ADAPTER` in place of the
        adapter's name (``...to_q.lora_A.dedit.weight``), so a session's file does not depend on which adapter
        held it."""
        found = {}
        for n, p in self.unet.named_parameters():
            parts = n.split(".")
            at = next((k + 1 for k in range(len(parts) - 1) if parts[k].startswith("lora_")), None)
            if at is not None and parts[at] == adapter:
                found[".".join(parts[:at] + [LORA_ADAPTER] + parts[at + 1:])] = p
        return found

    def reset_unet(self) -> None:
        """Undo any learned delta: the UNet as loaded, bit for bit and with its own parameter names (the LoRA
        wrappers are unloaded with every adapter, not just switched off)."""
        if self.adapters:
            self.unet.unload_lora()
            self.adapters.clear()
        self._base_unet()

    def _base_unet(self) -> None:
        """The loaded weights in place and the adapters switched off (they stay loaded for a swap back)."""
        if self.adapters:
            self.unet.disable_adapters()
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, value in self._pristine.items():
                params[n].data = value.to(params[n].device, copy=True)
        self._pristine.clear()
        self.item_adapters = None
        self._delta_source = None

    def load_unet_delta(self, mode: str, tensors: dict[str, torch.Tensor], lora: dict | None = None,
                        adapter: str = LORA_ADAPTER) -> None:
        """Put learned UNet parameters in place ('attn': replaced q/k/v weights; 'lora': the weights of the
        adapter named ``adapter``, loaded unless it holds these very tensors already)."""
        if not tensors:
            self._base_unet()
            return
        if mode == PER_ITEM_MODE:
            self._base_unet()
            self.item_adapters = ItemAdapters.from_saved(self.unet, tensors, lora["rank"], lora["alpha"])
            self._delta_source = tensors
            return
        if mode == "lora":
            self._use_adapter(adapter, tensors, lora)
        else:
            self.reset_unet()
            self.remember_pristine(tensors)
            self._copy_in(dict(self.unet.named_parameters()), tensors)
        self.unet.requires_grad_(False)   # peft's set_adapter makes the active adapter trainable
        self._delta_source = tensors

    def _use_adapter(self, name: str, tensors: dict[str, torch.Tensor], lora: dict) -> None:
        self._base_unet()
        stale = [n for n, held in self.adapters.items() if held is None or (n == name and held is not tensors)]
        if stale:   # the finetune's own adapter, or this session's adapter with weights since replaced
            self.unet.delete_adapters(stale)
            for n in stale:
                del self.adapters[n]
        if name not in self.adapters:
            self._add_adapter(name, lora["rank"], lora["alpha"], lora["target_modules"], seed=0)
            self._copy_in(self.lora_parameters(name), tensors)
            self.adapters[name] = tensors
            evicted = list(self.adapters)[:-MAX_SESSION_ADAPTERS]
            if evicted:
                self.unet.delete_adapters(evicted)
                for n in evicted:
                    del self.adapters[n]
        self.adapters.move_to_end(name)
        self.unet.set_adapter(name)
        self.unet.enable_adapters()

    def _copy_in(self, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise KeyError(f"learned weights name {len(unknown)} parameters this UNet lacks (e.g. {unknown[0]}); "
                           f"they belong to another model")
        device = self.device
        with torch.no_grad():
            for n, value in tensors.items():
                params[n].data = value.to(device=device, dtype=params[n].dtype).clone()

    def use_session(self, session: Session) -> None:
        """Put exactly this finetuned session's UNet delta in place, swapped only when another one is in place."""
        unet = session.load_weights("unet")
        if unet is not self._delta_source or not unet:
            meta = session.weights_meta
            self.load_unet_delta(meta["mode"], unet, meta.get("lora"), session_adapter(session.id))
