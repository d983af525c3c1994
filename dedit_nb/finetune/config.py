"""Finetune settings, result and errors."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from .. import conditioning as C
from ..parameters import FINETUNE, MAX_FINETUNE_SEED  # noqa: F401  (MAX_FINETUNE_SEED: re-exported)
from ..profiles import SD1, resolve

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class FinetuneConfig:
    """Finetune settings. Defaults: the Stable Diffusion 1.x profile (the reference's 5 tokens, 500 + 500
    steps, lr 1e-4 then 5e-5); :meth:`for_model` takes another model's profile. ``profile`` records how
    for_model chose the values (kept with the session's finetune state)."""

    num_tokens: int = 5
    stage1_steps: int = SD1.stage1_steps
    stage2_steps: int = SD1.stage2_steps
    stage1_lr: float = SD1.stage1_lr
    stage2_lr: float = SD1.stage2_lr
    lora: bool = False
    lora_rank: int = 4
    lora_lr: float = SD1.lora_lr
    per_item: bool = False                 # stage 2: one LoRA per item (lora_rank, lora_lr), routed by the item map
    batch_size: int = SD1.batch_size
    grad_accum: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    item_prompt_length: int = C.ITEM_PROMPT_LENGTH
    gradient_checkpointing: bool = False   # recompute activations in the backward pass: less memory, more time
    offload_text_and_vae: bool = False     # the VAE (after encoding) and, in stage 2, the text encoders wait on the CPU
    profile: dict | None = None

    @classmethod
    def for_model(cls, model, **settings) -> "FinetuneConfig":
        """Settings for ``model`` (a loaded model, folder, hub id or "offline"): the schedule, learning rates
        and batch of its profile (:mod:`dedit_nb.profiles`) wherever ``settings`` leaves them out or None."""
        names = ("stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr", "lora_lr", "batch_size")
        resolved = resolve(model, {n: settings.pop(n, None) for n in names})
        return cls(**resolved.values, **settings, profile=resolved.record())

    def __post_init__(self):
        FINETUNE.check({f.name: getattr(self, f.name) for f in fields(self) if f.name in FINETUNE}, resolved=True)
        if self.per_item and self.lora:
            raise ValueError("FinetuneConfig: per_item=True trains one LoRA per item in place of the shared one; "
                             "pass lora=False with it")

    def resumable_with(self, other: "FinetuneConfig") -> bool:
        """Whether a finetune started with ``other`` can continue under these settings (only the step
        counts, the checkpoint interval and the memory options that leave the weights alone may change)."""
        free = {"stage1_steps", "stage2_steps", "checkpoint_every", "gradient_checkpointing", "offload_text_and_vae",
                "profile"}
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name not in free)


@dataclass
class FinetuneResult:
    loss: dict[str, list[float]] = field(default_factory=lambda: {"stage1": [], "stage2": []})
    completed: bool = False

    def plot(self, ax=None):
        """Loss curves of both stages (matplotlib)."""
        import matplotlib.pyplot as plt
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        s1, s2 = self.loss["stage1"], self.loss["stage2"]
        ax.plot(range(len(s1)), s1, label="stage 1: item tokens")
        ax.plot(range(len(s1), len(s1) + len(s2)), s2, label="stage 2: UNet")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        return ax


Callback = Callable[[str, int, float], "bool | None"]


class NonFiniteError(FloatingPointError):
    """A finetune step that made the loss or the learned weights NaN or infinite; nothing of it is saved."""

    def __init__(self, stage: int, step: int, what: str):
        lr = "stage1_lr" if stage == 1 else "stage2_lr (lora_lr with LoRA)"
        super().__init__(f"{what} became NaN or infinite at stage {stage}, step {step}; the finetune stopped "
                         f"before saving it, so the session keeps the weights it had: lower {lr} and finetune "
                         "again")
