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
from ..session import Session, save_joint_weights
from .config import Callback, FinetuneConfig, FinetuneResult, NonFiniteError
from .state import FP32Masters


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

    def __post_init__(self):
        self.noise_scheduler = self.model.training_scheduler()

    def conditioning(self, data: _ImageData) -> C.Conditioning:
        return C.encode_items(self.model, data.prompts, [self.config.item_prompt_length] * len(data.prompts),
                              data.areas, data.names)

    def loss(self, data: _ImageData, cond: C.Conditioning, gen: torch.Generator) -> torch.Tensor:
        model, bs, scheduler = self.model, self.config.batch_size, self.noise_scheduler
        states, layout, pooled = C.batch([cond] * bs, [data.labels] * bs)
        latents = data.latents.expand(bs, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=gen).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, t).to(model.dtype)
        pooled = None if pooled is None else pooled.to(model.dtype)
        pred = model.predict(noisy, t, states.to(model.dtype), layout, pooled)
        if model.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        elif model.prediction_type == "sample":
            target = latents
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    def save(self, stage: int, next_step: int, tensors: dict[str, dict], scaler, done: bool) -> None:
        broken = sorted(kind for kind in ("tokens", "unet") for t in tensors.get(kind, {}).values()
                        if not torch.isfinite(t).all())
        if broken:
            raise NonFiniteError(stage, next_step - 1, f"the learned {' and '.join(sorted(set(broken)))} weights")
        fstate = {"config": asdict(self.config), "model_id": self.model.model_id, "stage": stage, "step": next_step,
                  "done": done, "loss": self.result.loss, "scaler": {} if done else scaler.state_dict()}
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
    encoders = [s.encoder for s in model.text.slots if getattr(s.encoder, "supports_gradient_checkpointing", False)]
    for e in encoders:
        e.gradient_checkpointing_enable()
    try:
        yield
    finally:
        model.unet.disable_gradient_checkpointing()
        for e in encoders:
            e.gradient_checkpointing_disable()


def _train(run: _Run, stage: _Stage, start: int) -> bool:
    """Steps ``start`` .. ``stage.steps`` of a stage; returns True when the callback stopped it."""
    config, key = run.config, f"stage{stage.number}"
    model = run.model
    scaler = torch.amp.GradScaler(model.device.type, init_scale=2.0 ** 10, enabled=model.dtype == torch.float16)
    if run.resumed.get("scaler"):
        scaler.load_state_dict(run.resumed["scaler"])
    del run.result.loss[key][start:]
    last_stage = stage.number == 2
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, leave=True, disable=not run.progress,
               desc=f"stage {stage.number}: " + ("UNet" if last_stage else "item tokens"))
    with _memory_options(model, config):
        for step in bar:
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
            stop = run.callback is not None and run.callback(key, step, value) is False
            end = step + 1 == stage.steps
            if stop or end or (step + 1) % config.checkpoint_every == 0:
                run.save(stage.number, step + 1, stage.saved(), scaler, done=end and last_stage)
            if stop:
                bar.close()
                return True
    if stage.steps <= start:
        run.save(stage.number, stage.steps, stage.saved(), scaler, done=last_stage)
    bar.close()
    return False
