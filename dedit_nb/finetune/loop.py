"""The training loop both stages share: the loss of a step, checkpoints, and the step loop itself."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import conditioning as C
from ..callbacks import callback_outputs
from ..denoiser import Denoiser
from ..session import Session, save_joint_weights
from .config import Callback, FinetuneConfig, FinetuneResult, FinetuneRun, NonFiniteError
from .schedules import lr_factor, min_snr_weight
from .state import FP32Masters
from .stopping import Plateau, validation_noise, validation_timesteps


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


@dataclass
class _ImageData:
    latents: torch.Tensor        # fp32, encoded once
    labels: torch.Tensor
    prompts: list[str]
    names: list[str]
    areas: list[float]


@dataclass
class _Run:
    """What both stages share: the model, the sessions' images, settings, loss record and how to save."""

    model: object
    sessions: list[Session]
    config: FinetuneConfig
    tokens: list[str]
    images: list[_ImageData]
    result: FinetuneResult
    meta: dict
    callback: Callback | None
    progress: bool
    resumed: dict = field(default_factory=dict)   # the stage being resumed: "optimizer" state with the fp32
    noise_scheduler: object = None                # masters, "scaler" state, fp32 token "rows"
    validation_batch: list | None = None          # (noise, timesteps) per image, drawn at the first validation

    def __post_init__(self):
        self.noise_scheduler = self.model.training_scheduler()

    def conditioning(self, data: _ImageData) -> C.Conditioning:
        return C.encode_items(self.model, data.prompts, [self.config.item_prompt_length] * len(data.prompts),
                              data.areas, data.names)

    def loss(self, data: _ImageData, cond: C.Conditioning, gen: torch.Generator) -> torch.Tensor:
        """A training step's loss on one image: a batch of random noise and timesteps, each sample's error
        weighted by Min-SNR-gamma (all ones when it is off)."""
        bs, scheduler = self.config.batch_size, self.noise_scheduler
        latents = data.latents.expand(bs, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=gen).to(latents.device)
        weights = min_snr_weight(scheduler.alphas_cumprod, t, self.config.min_snr_gamma, self.model.prediction_type)
        return (self.errors(data, cond, noise, t) * weights).mean()

    def errors(self, data: _ImageData, cond: C.Conditioning, noise: torch.Tensor, t: torch.Tensor
               ) -> torch.Tensor:
        """The mean squared error of each sample's prediction at ``noise`` and timesteps ``t``."""
        model, bs, scheduler = self.model, len(t), self.noise_scheduler
        states, layout, pooled = C.batch([cond] * bs, [data.labels] * bs)
        latents = data.latents.expand(bs, -1, -1, -1)
        noisy = scheduler.add_noise(latents, noise, t).to(model.dtype)
        pooled = None if pooled is None else pooled.to(model.dtype)
        pred = model.predict(noisy, t, states.to(model.dtype), layout, pooled)
        target = Denoiser.from_scheduler(scheduler).target(latents, noise, t)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    @torch.no_grad()
    def validation_loss(self, conditionings: list[C.Conditioning]) -> float:
        """The unweighted loss at fixed noise and timesteps (the same at every call), averaged over images."""
        if self.validation_batch is None:
            t = validation_timesteps(self.noise_scheduler.config.num_train_timesteps)
            noise = validation_noise(self.config.seed, [tuple(d.latents.shape[1:]) for d in self.images])
            self.validation_batch = [(n.to(d.latents), t.to(d.latents.device)) for n, d in zip(noise, self.images)]
        errors = [self.errors(d, c, n, t).mean().item()
                  for d, c, (n, t) in zip(self.images, conditionings, self.validation_batch)]
        return sum(errors) / len(errors)

    def save(self, stage: int, next_step: int, tensors: dict[str, dict], scaler, done: bool) -> None:
        broken = sorted(kind for kind in ("tokens", "unet") for t in tensors.get(kind, {}).values()
                        if not torch.isfinite(t).all())
        if broken:
            raise NonFiniteError(stage, next_step - 1, f"the learned {' and '.join(sorted(set(broken)))} weights")
        fstate = {"config": asdict(self.config), "model_id": self.model.model_id, "stage": stage, "step": next_step,
                  "done": done, "loss": self.result.loss, "validation": self.result.validation,
                  "stopped": self.result.stopped, "scaler": {} if done else scaler.state_dict()}
        if done:
            tensors = {**tensors, "optimizer": {}}
        save_joint_weights(self.sessions, tensors, self.model.model_id, self.meta, fstate)


@dataclass
class _Stage:
    """One stage as the shared loop runs it."""

    number: int
    steps: int
    optimizer: torch.optim.Optimizer
    conditionings: Callable[[], list[C.Conditioning]]   # one per image, called every step
    saved: Callable[[], dict[str, dict]]                # tokens / unet / optimizer tensors to checkpoint
    masters: FP32Masters | None = None


@contextlib.contextmanager
def _memory_options(model, config: FinetuneConfig):
    """Gradient checkpointing of the UNet and the text encoders for the duration of a stage, if asked."""
    if not config.gradient_checkpointing:
        yield
        return
    model.unet.enable_gradient_checkpointing()
    encoders = [s.encoder for s in model.conditioner.slots if getattr(s.encoder, "supports_gradient_checkpointing", False)]
    for e in encoders:
        e.gradient_checkpointing_enable()
    try:
        yield
    finally:
        model.unet.disable_gradient_checkpointing()
        for e in encoders:
            e.gradient_checkpointing_disable()


def _train(run: _Run, stage: _Stage, start: int) -> bool:
    """Steps ``start`` .. ``stage.steps`` of a stage, or fewer when it plateaus; returns True when the callback
    stopped it."""
    config, key = run.config, f"stage{stage.number}"
    model = run.model
    scaler = torch.amp.GradScaler(model.device.type, init_scale=2.0 ** 10, enabled=model.dtype == torch.float16)
    if run.resumed.get("scaler"):
        scaler.load_state_dict(run.resumed["scaler"])
    del run.result.loss[key][start:]
    plateau, ended_before = _resume_stopping(run, key, stage.steps, start)
    base_lrs = [group["lr"] for group in stage.optimizer.param_groups]
    callback_run = FinetuneRun(model, config, run.result)
    last_stage = stage.number == 2
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, leave=True,
               disable=not run.progress or ended_before,
               desc=f"stage {stage.number}: " + ("UNet" if last_stage else "item tokens"))
    with _memory_options(model, config):
        if config.validate_every and not run.result.validation[key] and not ended_before:
            _validate(run, stage, key, start, plateau)   # where the curve starts (one value never plateaus)
        for step in ([] if ended_before else bar):
            for group, lr in zip(stage.optimizer.param_groups, base_lrs):
                group["lr"] = lr * lr_factor(step, stage.steps, config.lr_warmup_steps, config.lr_schedule)
            gen = _step_generator(config.seed, stage.number, step)
            total = 0.0
            for _ in range(config.grad_accum):
                for data, cond in zip(run.images, stage.conditionings()):
                    loss = run.loss(data, cond, gen) / config.grad_accum
                    scaler.scale(loss).backward()
                    total += loss.item()
            if stage.masters is not None:
                stage.masters.grads_to_masters()
            scaler.step(stage.optimizer)
            scaler.update()
            stage.optimizer.zero_grad(set_to_none=True)
            if stage.masters is not None:
                stage.masters.masters_to_params()
            value = total / len(run.images)
            if not math.isfinite(value):
                raise NonFiniteError(stage.number, step, "the loss")
            run.result.loss[key].append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            if run.callback is not None:
                callback_outputs(run.callback, run.callback(callback_run, key, step, {"loss": value}),
                                 "run.stop() ends the finetune")
            stop = callback_run.stopped
            ended = bool(config.validate_every) and (step + 1) % config.validate_every == 0 and \
                _validate(run, stage, key, step + 1, plateau)
            end = ended or step + 1 == stage.steps
            if end:
                run.result.stopped[key] = {"reason": "plateau" if ended else "step limit", "step": step + 1,
                                           "limit": stage.steps}
            if stop or end or (step + 1) % config.checkpoint_every == 0:
                run.save(stage.number, step + 1, stage.saved(), scaler, done=end and last_stage)
            if stop:
                bar.close()
                return True
            if end:
                break
    if ended_before or stage.steps <= start:
        run.result.stopped.setdefault(key, {"reason": "step limit", "step": start, "limit": stage.steps})
        run.save(stage.number, start, stage.saved(), scaler, done=last_stage)
    bar.close()
    return False


def _validate(run: _Run, stage: _Stage, key: str, done_steps: int, plateau: Plateau) -> bool:
    """Record the validation loss after ``done_steps`` steps; True when the stage should stop on a plateau."""
    with torch.no_grad():
        value = run.validation_loss(stage.conditionings())
    run.result.validation[key].append([done_steps, value])
    return plateau.update(value) and run.config.stop_when == "plateau"


def _resume_stopping(run: _Run, key: str, steps: int, start: int) -> tuple[Plateau, bool]:
    """The plateau rule as it stood after ``start`` steps of a stage (its validation losses replayed), and
    whether the stage had already ended there on a plateau. A stage extended past the step limit it
    plateaued under starts its patience afresh."""
    config = run.config
    history = run.result.validation[key]
    history[:] = [v for v in history if v[0] <= start]
    plateau = Plateau(config.patience, config.min_delta)
    for _, value in history:
        plateau.update(value)
    previous = run.result.stopped.pop(key, None)
    if previous is not None and previous["reason"] == "plateau" and config.stop_when == "plateau":
        if steps <= previous["limit"]:
            run.result.stopped[key] = previous
            return plateau, True
        plateau.waited = 0
    return plateau, False
