"""Finetune settings, result and errors."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from .. import conditioning as C
from ..parameters import FINETUNE, MAX_FINETUNE_SEED  # noqa: F401  (MAX_FINETUNE_SEED: re-exported)
from ..profiles import SD1, resolve

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# settings a model profile holds (dedit_nb.profiles); for_model fills in those it is not given
PROFILE_SETTINGS = tuple(f.name for f in FINETUNE if f.profile)


@dataclass
class FinetuneConfig:
    """Finetune settings. Defaults: the Stable Diffusion 1.x profile (the reference's 5 tokens, 500 + 500
    steps, lr 1e-4 then 5e-5); :meth:`for_model` takes another model's profile. ``profile`` records how
    for_model chose the values (kept with the session's finetune state).

    What speeds a finetune up (each off in the SD profiles): ``min_snr_gamma`` weighs each timestep's loss by
    Min-SNR-gamma (Hang et al. 2023); ``init_tokens_from_name`` starts an item's tokens from the mean
    embedding of its name's words (textual inversion's initializer token); ``lr_warmup_steps`` and
    ``lr_schedule`` shape each stage's learning rate; ``stop_when="plateau"`` ends a stage once its validation
    loss (fixed noise at fixed timesteps, every ``validate_every`` steps) has not fallen by ``min_delta`` of
    its best for ``patience`` validations. ``validate_every=0`` computes no validation loss."""

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
    min_snr_gamma: float = SD1.min_snr_gamma
    init_tokens_from_name: bool = SD1.init_tokens_from_name
    lr_warmup_steps: int = SD1.lr_warmup_steps
    lr_schedule: str = SD1.lr_schedule
    stop_when: str = SD1.stop_when
    validate_every: int = SD1.validate_every
    patience: int = SD1.patience
    min_delta: float = SD1.min_delta
    profile: dict | None = None

    @classmethod
    def for_model(cls, model, **settings) -> "FinetuneConfig":
        """Settings for ``model`` (a loaded model, folder, hub id or "offline"): the schedule, learning rates,
        batch and speed-ups of its profile (:mod:`dedit_nb.profiles`) wherever ``settings`` leaves them out or
        None. A ``profile`` record given (a notebook's, covering its other settings too) is kept instead."""
        resolved = resolve(model, {n: settings.pop(n, None) for n in PROFILE_SETTINGS})
        profile = settings.pop("profile", None) or resolved.record()
        return cls(**resolved.values, **settings, profile=profile)

    def __post_init__(self):
        FINETUNE.check({f.name: getattr(self, f.name) for f in fields(self) if f.name in FINETUNE}, resolved=True)
        if self.stop_when == "plateau" and not (self.validate_every and self.patience):
            raise ValueError("stop_when='plateau' needs validate_every >= 1 and patience >= 1 (it stops on the "
                             "validation loss); set them, or stop_when='steps'")
        if self.per_item and self.lora:
            raise ValueError("FinetuneConfig: per_item=True trains one LoRA per item in place of the shared one; "
                             "pass lora=False with it")

    def resumable_with(self, other: "FinetuneConfig") -> bool:
        """Whether a finetune started with ``other`` can continue under these settings (only the step
        counts, the checkpoint interval, the memory options that leave the weights alone and when a stage
        stops may change)."""
        free = {"stage1_steps", "stage2_steps", "checkpoint_every", "gradient_checkpointing", "offload_text_and_vae",
                "profile", "stop_when", "validate_every", "patience", "min_delta"}
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name not in free)


STAGE_TITLES = {"stage1": "stage 1: item tokens", "stage2": "stage 2: UNet"}


@dataclass
class FinetuneResult:
    """The loss of every step, the validation losses ``[step, loss]`` (the loss after that many steps), and
    why each stage stopped: ``{"reason": "plateau" | "step limit", "step": n, "limit": its step limit}``."""

    loss: dict[str, list[float]] = field(default_factory=lambda: {"stage1": [], "stage2": []})
    completed: bool = False
    validation: dict[str, list[list[float]]] = field(default_factory=lambda: {"stage1": [], "stage2": []})
    stopped: dict[str, dict] = field(default_factory=dict)

    def stop_reason(self, stage: str) -> str:
        """Why a stage stopped, in words ("plateau at step 120 of 200", "the step limit (200)", "running")."""
        stop = self.stopped.get(stage)
        if stop is None:
            return "not finished"
        if stop["reason"] == "plateau":
            return f"plateau at step {stop['step']} of {stop['limit']}"
        return f"the step limit ({stop['step']})"

    def summary(self) -> str:
        """Why each stage stopped, in one line."""
        return "; ".join(f"{title} stopped: {self.stop_reason(key)}" for key, title in STAGE_TITLES.items())

    def plot(self, axes=None):
        """Per stage (matplotlib, side by side): the loss of every step and, on its own scale, the validation
        loss, titled with why the stage stopped."""
        import matplotlib.pyplot as plt
        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
        for ax, (key, title) in zip(axes, STAGE_TITLES.items()):
            ax.plot(range(1, len(self.loss[key]) + 1), self.loss[key], color="0.6", lw=0.8, label="training loss")
            ax.set(xlabel="step", ylabel="training loss", title=f"{title}\nstopped: {self.stop_reason(key)}")
            if self.validation.get(key):
                steps, values = zip(*self.validation[key])
                val = ax.twinx()
                val.plot(steps, values, "o-", color="C1", ms=3, label="validation loss")
                val.set_ylabel("validation loss (fixed noise)", color="C1")
        return axes


class FinetuneRun:
    """A running finetune as its callback sees it (the first argument, where diffusers passes the pipeline):
    ``model``, ``config``, ``result`` (the losses so far) and :meth:`stop`."""

    def __init__(self, model, config: FinetuneConfig, result: FinetuneResult):
        self.model, self.config, self.result, self.stopped = model, config, result, False

    def stop(self) -> None:
        """End the finetune after this step, with a checkpoint (calling finetune again resumes it)."""
        self.stopped = True


# diffusers' callback style: callback(run, stage, step, callback_kwargs) -> dict, with {"loss": ...}
Callback = Callable[[FinetuneRun, str, int, dict], dict]


class NonFiniteError(FloatingPointError):
    """A finetune step that made the loss or the learned weights NaN or infinite; nothing of it is saved."""

    def __init__(self, stage: int, step: int, what: str):
        lr = "stage1_lr" if stage == 1 else "stage2_lr (lora_lr with LoRA)"
        super().__init__(f"{what} became NaN or infinite at stage {stage}, step {step}; the finetune stopped "
                         f"before saving it, so the session keeps the weights it had: lower {lr} and finetune "
                         "again")
