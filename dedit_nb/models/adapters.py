"""Per-item adapters routed by the item map: each item's own LoRA on the cross-attention q/k/v.

Item ``i``'s adapter changes the queries of item ``i``'s pixels and the keys and values of item ``i``'s prompt
tokens, nothing else. Because grouped cross-attention lets a pixel see only its own item's keys, an item's
cross-attention output depends on its own adapter alone: an adapter learned in one session can be used in
another (the item bank, :mod:`dedit_nb.bank`) without finetuning the two together.

The adapters of all items that take part in a UNet call are stacked per layer and projection (``A``:
``(slots, rank, in)``, ``B``: ``(slots, out, rank)``); an :class:`~dedit_nb.attention.ItemLayout` says which
slot each item uses (``-1``: none). One call computes every position's down-projection for every slot,
keeps its own slot's (the others are multiplied by exact zeros, so they cannot change it, whatever their
values) and projects up: one small matmul per projection, whatever the number of items.
"""
from __future__ import annotations

import hashlib
import json
import weakref

import torch
import torch.nn.functional as F

PROJECTIONS = ("to_q", "to_k", "to_v")
PER_ITEM_MODE = "per_item"   # a session's weights mode when its items have their own adapters


def _linear(module):
    """The plain ``nn.Linear`` of a projection (peft wraps it in a LoRA layer with a ``base_layer``)."""
    return getattr(module, "base_layer", module)


class ItemAdapters:
    """Stacked per-item LoRA weights for every cross-attention layer of a UNet.

    ``tensors`` maps ``"{layer}.{projection}.lora_A"`` / ``".lora_B"`` to ``(slots, rank, in)`` /
    ``(slots, out, rank)`` tensors. ``base`` (optional) maps ``"{layer}.{projection}"`` to the ``(weight,
    bias)`` the slotted positions use instead of the UNet's current projection: when the UNet carries another
    session's shared delta, a banked item still sees the base weights its adapter was trained on. ``keys``:
    slot ``m``'s item, named by its first learned token (which no other item's prompt holds).
    """

    def __init__(self, unet, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                 base: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
                 keys: list[str] | None = None):
        from ..attention import cross_attention_layers
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.keys = list(keys or [])
        self.layer_names = {module: name for name, module in cross_attention_layers(unet)}
        self.tensors = tensors
        self.base = base or {}
        missing = [f"{n}.{p}.lora_{ab}" for n in self.layer_names.values() for p in PROJECTIONS for ab in "AB"
                   if f"{n}.{p}.lora_{ab}" not in tensors]
        if missing:
            raise KeyError(f"per-item adapter weights lack {len(missing)} tensors (e.g. {missing[0]}); they were "
                           "made for another UNet")
        self.num_slots = int(next(iter(tensors.values())).shape[0]) if tensors else 0

    @classmethod
    def fresh(cls, unet, keys: list[str], rank: int, alpha: float, generator: torch.Generator
              ) -> "ItemAdapters":
        """New adapters (fp32, on the UNet's device): ``A`` gaussian (std 1/rank, peft's "gaussian" init),
        ``B`` zero, so every item starts from the base model."""
        from ..attention import cross_attention_layers
        device = next(unet.parameters()).device
        tensors = {}
        for name, module in cross_attention_layers(unet):
            for proj in PROJECTIONS:
                linear = _linear(getattr(module, proj))
                a = torch.randn(len(keys), rank, linear.in_features, generator=generator) / rank
                tensors[f"{name}.{proj}.lora_A"] = a.to(device)
                tensors[f"{name}.{proj}.lora_B"] = torch.zeros(len(keys), linear.out_features, rank, device=device)
        return cls(unet, tensors, rank, alpha, keys=keys)

    # --- one slot's weights (what a session and a bank file store) ---------------------------------------
    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: v[slot].detach() for k, v in self.tensors.items()}

    @classmethod
    def stack(cls, unet, slots: dict[str, dict[str, torch.Tensor]], rank: int, alpha: float, base=None
              ) -> "ItemAdapters":
        """Adapters whose slots hold ``slots[key]`` (as :meth:`slot_tensors` returns) in order, on the UNet's
        device and in its dtype."""
        param = next(unet.parameters())
        names = next(iter(slots.values())).keys()
        tensors = {n: torch.stack([s[n] for s in slots.values()]).to(device=param.device, dtype=param.dtype)
                   for n in names}
        return cls(unet, tensors, rank, alpha, base, keys=list(slots))

    @classmethod
    def combine(cls, unet, slots: dict[str, tuple[dict[str, torch.Tensor], int, float]], base=None
                ) -> "ItemAdapters":
        """Adapters of several origins (a session's items, bank items) in one stack: ``slots[key]`` is ``(slot
        tensors, rank, alpha)``; each slot's ``alpha / rank`` is folded into its ``B`` and smaller ranks are padded
        with zeros, so slots of any rank share one stack."""
        rank = max(r for _, r, _ in slots.values())

        def fitted(name: str, value: torch.Tensor, r: int, alpha: float) -> torch.Tensor:
            value = value.float() * (alpha / r if name.endswith("lora_B") else 1.0)
            pad = (0, 0, 0, rank - r) if name.endswith("lora_A") else (0, rank - r)
            return F.pad(value, pad)
        folded = {key: {n: fitted(n, v, r, a) for n, v in tensors.items()} for key, (tensors, r, a) in slots.items()}
        return cls.stack(unet, folded, rank, float(rank), base)

    @classmethod
    def from_saved(cls, unet, saved: dict[str, torch.Tensor], rank: int, alpha: float) -> "ItemAdapters":
        """Adapters from a session's saved tensors (``"{key}/{layer}.{projection}.lora_A"``), one slot per key."""
        return cls.stack(unet, split_by_item(saved), rank, alpha)

    def slots_for(self, prompts: list[str]) -> list[int]:
        """The slot of each prompt: that of the item whose tokens it holds (``-1`` for a plain text prompt)."""
        return [next((m for m, key in enumerate(self.keys) if key in prompt), -1) for prompt in prompts]

    # --- routing (called by GroupedAttnProcessor) --------------------------------------------------------
    def _delta(self, x: torch.Tensor, slots: torch.Tensor, layer: str, proj: str) -> torch.Tensor:
        a, b = self.tensors[f"{layer}.{proj}.lora_A"], self.tensors[f"{layer}.{proj}.lora_B"]
        down = torch.einsum("bld,mrd->blmr", x.to(a.dtype), a)
        keep = F.one_hot(slots.clamp_min(0), self.num_slots).to(down.dtype) * (slots >= 0)[..., None]
        down = down * keep[..., None]          # other slots' terms become exact zeros
        up = down.flatten(2) @ b.permute(0, 2, 1).reshape(-1, b.shape[1])
        return up * self.scale

    def _project(self, attn, proj: str, layer: str, x: torch.Tensor, current: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
        routed = slots >= 0
        if not bool(routed.any()):
            return current
        base = self.base.get(f"{layer}.{proj}")
        if base is not None:   # slotted positions start from the base weights, not another session's delta
            current = torch.where(routed[..., None], F.linear(x, base[0], base[1]), current)
        return current + self._delta(x, slots, layer, proj).to(current.dtype)

    def route(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, query: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(B, L, inner)`` projections of one cross-attention layer with each item's adapter added at its
        pixels (queries) and its prompt tokens (keys and values)."""
        layer = self.layer_names[attn]
        pixel_slots = layout.pixel_slots(hidden_states.shape[1], hidden_states.device)
        token_slots = layout.token_slots(encoder_hidden_states.shape[1], hidden_states.device)
        query = self._project(attn, "to_q", layer, hidden_states, query, pixel_slots)
        key = self._project(attn, "to_k", layer, encoder_hidden_states, key, token_slots)
        value = self._project(attn, "to_v", layer, encoder_hidden_states, value, token_slots)
        return query, key, value

    def route_out(self, attn, hidden_states: torch.Tensor, layout) -> torch.Tensor:
        """The layer's output projection, from the base weights at slotted pixels when a shared delta wraps it
        (a shared LoRA session's ``to_out.0``)."""
        out = attn.to_out[0](hidden_states)
        base = self.base.get(f"{self.layer_names[attn]}.to_out.0")
        if base is None:
            return out
        slotted = layout.pixel_slots(hidden_states.shape[1], hidden_states.device) >= 0
        return torch.where(slotted[..., None], F.linear(hidden_states, base[0], base[1]), out)


def split_by_item(saved: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"{key}/{name}": tensor}`` -> ``{key: {name: tensor}}``."""
    items: dict[str, dict[str, torch.Tensor]] = {}
    for full, value in saved.items():
        key, name = full.split("/", 1)
        items.setdefault(key, {})[name] = value
    return items


# --- the base model's identity ---------------------------------------------------------------------------
def base_projection_weights(unet, pristine: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The cross-attention q/k/v weights of the UNet as loaded (``pristine``: the loaded values of those a
    shared delta replaced), keyed ``"{layer}.{projection}.weight"``: what a per-item adapter is trained on."""
    from ..attention import cross_attention_layers
    pristine = pristine or {}
    weights = {}
    for name, module in cross_attention_layers(unet):
        for proj in PROJECTIONS:
            key = f"{name}.{proj}.weight"
            weights[key] = pristine.get(key, _linear(getattr(module, proj)).weight).detach()
    return weights


_identities: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_identity(model) -> dict[str, str]:
    """What a per-item adapter and its tokens depend on: ``model_id``, a hash of the UNet's and text encoders'
    configs, and a hash of the base cross-attention q/k/v weights rounded to fp16 (so a model loaded in fp32
    or fp16 has one identity; a bf16 load rounds differently and has another). Cached per model."""
    cached = _identities.get(model)
    if cached is not None:
        return dict(cached)
    configs = [dict(model.unet.config)] + [slot.encoder.config.to_dict() for slot in model.conditioner.slots]
    for c in configs:
        for volatile in ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash",
                         "torch_dtype", "dtype", "_use_default_values"):
            c.pop(volatile, None)
    config_hash = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for key, weight in sorted(base_projection_weights(model.unet, model.delta._pristine).items()):
        digest.update(key.encode())
        digest.update(weight.to("cpu", torch.float16).contiguous().numpy().tobytes())
    identity = {"model_id": str(model.model_id), "config_sha256": config_hash,
                "weights_sha256": digest.hexdigest()[:16]}
    _identities[model] = identity
    return dict(identity)
