"""Two-stage D-Edit finetuning of a session's items.

Stage 1 learns each item's new token embeddings (every other row of the embedding tables is restored after
each step). Stage 2 trains the UNet's cross-attention q/k/v projections, or a LoRA on all attention layers
(peft), with the tokens frozen. All images of a session, and of any ``extra_sessions``, train jointly
(their losses add up in every step), so items can later move between them. Only trained tensors are saved
(safetensors), with the optimizer state and the loss history, every ``checkpoint_every`` steps: an
interrupted finetune resumes where it stopped and, because each step's noise comes from
``(seed, stage, step)``, ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import conditioning as C
from .images import rgb_to_tensor
from .session import Session, SessionError, save_joint_weights, settle_joint

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class FinetuneConfig:
    """Finetune settings (reference defaults: 5 tokens, 500 + 500 steps, lr 1e-4 then 5e-5)."""

    num_tokens: int = 5
    stage1_steps: int = 500
    stage2_steps: int = 500
    stage1_lr: float = 1e-4
    stage2_lr: float = 5e-5
    lora: bool = False
    lora_rank: int = 4
    lora_lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    checkpoint_every: int = 50
    seed: int = 0
    item_prompt_length: int = C.ITEM_PROMPT_LENGTH

    def __post_init__(self):
        for name in ("num_tokens", "batch_size", "grad_accum", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_steps", "stage2_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")

    def resumable_with(self, other: "FinetuneConfig") -> bool:
        """Whether a finetune started with ``other`` can continue under these settings (only the step
        counts and the checkpoint interval may change)."""
        free = {"stage1_steps", "stage2_steps", "checkpoint_every"}
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


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


@contextlib.contextmanager
def _autocast(model):
    if model.device.type == "cuda" and model.dtype != torch.float32:
        with torch.autocast("cuda", dtype=model.dtype):
            yield
    else:
        yield


def flatten_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's state as flat tensors ``"{param index}.{name}"`` (safetensors holds no nesting)."""
    flat = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"{idx}.{key}"] = torch.as_tensor(value).reshape(-1).clone()
    return flat


def restore_optimizer_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`flatten_optimizer_state` for an optimizer over the same parameters."""
    if not flat:
        return
    current = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        target = params[int(idx)]
        state.setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value.reshape(target.shape)
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})


@dataclass
class _ImageData:
    latents: torch.Tensor
    labels: torch.Tensor
    prompts: list[str]
    areas: list[float]


class _Trainer:
    def __init__(self, model, sessions: Sequence[Session], config: FinetuneConfig):
        self.model, self.config = model, config
        self.noise_scheduler = model.training_scheduler()
        self.images: list[_ImageData] = []
        for entry in (e for s in sessions for e in s.images):
            pixels = rgb_to_tensor(entry.working).to(model.device)
            latents = model.encode_images(pixels)
            labels = C.latent_labels(model, entry.labels, len(entry.items))
            areas = np.bincount(entry.labels.ravel(), minlength=len(entry.items)).astype(float).tolist()
            self.images.append(_ImageData(latents, labels, [it.prompt() for it in entry.items], areas))

    def conditioning(self, data: _ImageData) -> C.Conditioning:
        return C.encode_items(self.model, data.prompts, [self.config.item_prompt_length] * len(data.prompts),
                              data.areas)

    def loss(self, data: _ImageData, cond: C.Conditioning, gen: torch.Generator) -> torch.Tensor:
        bs = self.config.batch_size
        states, layout, pooled = C.batch([cond] * bs, [data.labels] * bs)
        latents = data.latents.expand(bs, -1, -1, -1)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bs,), generator=gen).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with _autocast(self.model):
            pred = self.model.predict(noisy, t, states, layout, pooled)
        if self.model.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        elif self.model.prediction_type == "sample":
            target = latents
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())


def finetune(model, session: Session, config: FinetuneConfig | None = None, callback: Callback | None = None,
             resume: bool = True, progress: bool = True, extra_sessions: Sequence[Session] = ()) -> FinetuneResult:
    """Finetune a session's items on a model and save the learned weights into the session.

    ``extra_sessions`` are finetuned jointly with it (their images' losses add up in every step, and the
    same weights are saved into each), so an item of one can be put into an image of another.
    ``callback(stage, step, loss)`` is called after every step; returning ``False`` stops after saving a
    checkpoint (resume later by calling again). With ``resume=False`` earlier weights are discarded.
    """
    config = config or FinetuneConfig()
    sessions = [session, *extra_sessions]
    if len({s.id for s in sessions}) != len(sessions):
        raise SessionError("the same session was given twice (or two sessions share an id: copy_to gives a new one)")
    if resume:  # the newest checkpoint every member holds, members in their first run's order
        sessions = settle_joint(sessions)
    state = session.finetune_state
    if state is not None and resume:
        previous = FinetuneConfig(**state["config"])
        if not config.resumable_with(previous):
            raise SessionError("this session's finetune was started with other settings "
                               f"({previous}); pass the same settings, or resume=False to start over")
        if session.joint_session_ids != {s.id for s in sessions}:
            raise SessionError("this session's finetune was started with other sessions; pass the same "
                               "extra_sessions, or resume=False to start over")
    else:
        state = None
    for s in sessions:  # every session is checked before any of them is changed
        s.check_model(model)
    if state is None:
        for s in sessions:
            if s.has_weights:
                s.discard_weights()
    model.reset_unet()

    tokens = [t for s in sessions for t in s.assign_tokens(config.num_tokens)]
    model.text.add_tokens(tokens, generator=torch.Generator().manual_seed(config.seed))
    if state is not None:
        model.text.set_token_rows(session.load_weights("tokens"))
    saved_loss = (state or {}).get("loss", {"stage1": [], "stage2": []})
    result = FinetuneResult(loss={k: list(v) for k, v in saved_loss.items()})
    stage, start = (state["stage"], state["step"]) if state is not None else (1, 0)
    if state is not None and state.get("done") and start >= _stage_steps(config, stage) and stage == 2:
        meta = session.weights_meta
        model.load_unet_delta(meta["mode"], session.load_weights("unet"), meta.get("lora"))
        result.completed = True
        return result

    trainer = _Trainer(model, sessions, config)
    meta = {"mode": "lora" if config.lora else "attn", "num_tokens": config.num_tokens,
            "joint": [{"id": s.id, "folder": str(s.folder)} for s in sessions]}
    if config.lora:
        meta["lora"] = {"rank": config.lora_rank, "alpha": float(config.lora_rank), "target_modules": LORA_TARGETS}

    def checkpoint(stage_: int, next_step: int, opt, done: bool) -> None:
        tensors = {"tokens": model.text.get_token_rows(tokens),
                   "unet": {n: p.detach() for n, p in _stage2_params(model, config).items()} if stage_ == 2 else {},
                   "optimizer": flatten_optimizer_state(opt) if opt is not None and not done else {}}
        fstate = {"config": asdict(config), "model_id": model.model_id, "stage": stage_, "step": next_step,
                  "done": done, "loss": result.loss}
        save_joint_weights(sessions, tensors, model.model_id, meta, fstate)

    if stage == 1:
        stopped = _run_stage1(model, trainer, tokens, start, result, callback, checkpoint, progress,
                              session.load_weights("optimizer") if state is not None else {})
        if stopped:
            return result
        stage, start = 2, 0
        state = None
    if config.lora:
        model.add_lora(config.lora_rank, float(config.lora_rank), LORA_TARGETS)
    else:
        model.remember_pristine(model.cross_attention_parameters())
    if state is not None and state["stage"] == 2:
        unet = session.load_weights("unet")
        params = _stage2_params(model, config)
        with torch.no_grad():
            for n, value in unet.items():
                params[n].data = value.to(params[n])
    stopped = _run_stage2(model, trainer, config, start, result, callback, checkpoint, progress,
                          session.load_weights("optimizer") if state is not None else {})
    result.completed = not stopped
    return result


def _stage_steps(config: FinetuneConfig, stage: int) -> int:
    return config.stage1_steps if stage == 1 else config.stage2_steps


def _stage2_params(model, config: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    return model.lora_parameters() if config.lora else model.cross_attention_parameters()


def _trainable_fp32(params) -> None:
    """Trainable tensors are kept in fp32 (autocast runs the fp16 model around them on CUDA)."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def _run_stage1(model, trainer: _Trainer, tokens, start, result, callback, checkpoint, progress, opt_state) -> bool:
    config = trainer.config
    tables = model.text.parameters_for_tokens()
    _trainable_fp32(tables)
    new_rows = [torch.zeros(t.shape[0], dtype=torch.bool, device=t.device) for t in tables]
    for mask, ids in zip(new_rows, model.text.token_ids(tokens)):
        mask[ids.to(mask.device)] = True
    frozen = [t.detach().clone() for t in tables]
    for t in tables:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(tables, lr=config.stage1_lr, weight_decay=0.0)
    restore_optimizer_state(opt, opt_state)
    try:
        return _loop(1, trainer, opt, tables, start, config.stage1_steps, result, callback, checkpoint, progress,
                     grad_rows=new_rows, frozen=frozen, encode_each_step=True)
    finally:
        for t in tables:
            t.requires_grad_(False)
            t.data = t.data.to(model.dtype)


def _run_stage2(model, trainer: _Trainer, config, start, result, callback, checkpoint, progress, opt_state) -> bool:
    params = _stage2_params(model, config)
    _trainable_fp32(params.values())
    for p in params.values():
        p.requires_grad_(True)
    lr = config.lora_lr if config.lora else config.stage2_lr
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    restore_optimizer_state(opt, opt_state)
    try:
        return _loop(2, trainer, opt, list(params.values()), start, config.stage2_steps, result, callback,
                     checkpoint, progress, encode_each_step=False)
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.data = p.data.to(model.dtype)


def _loop(stage, trainer: _Trainer, opt, params, start, steps, result, callback, checkpoint, progress,
          grad_rows=None, frozen=None, encode_each_step=True) -> bool:
    """Run one stage from ``start`` to ``steps``; returns True when a callback stopped it."""
    config = trainer.config
    key = f"stage{stage}"
    del result.loss[key][start:]
    cached = None
    if not encode_each_step:
        with torch.no_grad():
            cached = [trainer.conditioning(d) for d in trainer.images]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"stage {stage}: "
               + ("item tokens" if stage == 1 else "UNet"), disable=not progress, leave=True)
    for step in bar:
        gen = _step_generator(config.seed, stage, step)
        total = 0.0
        for _ in range(config.grad_accum):
            for i, data in enumerate(trainer.images):
                cond = trainer.conditioning(data) if cached is None else cached[i]
                loss = trainer.loss(data, cond, gen) / config.grad_accum
                loss.backward()
                total += loss.item()
        if grad_rows is not None:
            for p, rows in zip(params, grad_rows):
                if p.grad is not None:
                    p.grad[~rows] = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if frozen is not None:
            with torch.no_grad():
                for p, rows, orig in zip(params, grad_rows, frozen):
                    p[~rows] = orig[~rows]
        value = total / len(trainer.images)
        result.loss[key].append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        stop = callback is not None and callback(key, step, value) is False
        last = step + 1 == steps
        if stop or last or (step + 1) % config.checkpoint_every == 0:
            done = last and stage == 2
            checkpoint(stage, step + 1, opt, done)
        if stop:
            bar.close()
            return True
    if steps <= start:
        checkpoint(stage, steps, opt, stage == 2)
    bar.close()
    return False
