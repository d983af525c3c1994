"""Two-stage D-Edit finetuning of a session's items.

Stage 1 learns each item's new token embeddings (only those rows are trained: no other row of the embedding
tables changes). Stage 2 trains the UNet's cross-attention q/k/v projections, or a LoRA on all attention layers
(peft), with the tokens frozen. All images of a session, and of any ``extra_sessions``, train jointly
(their losses add up in every step), so items can later move between them. Only trained tensors are saved
(safetensors), with the optimizer state and the loss history, every ``checkpoint_every`` steps: an
interrupted finetune resumes where it stopped and, because each step's noise comes from
``(seed, stage, step)``, ends with the same weights as an uninterrupted one.

Precision: the model runs in the dtype it was loaded in (fp32, fp16 or bf16); what is trained is held in
fp32 master copies (the token rows; the q/k/v weights, whose model-dtype copies follow them; the LoRA
weights themselves), with loss scaling in fp16. The saved UNet delta is in the model's dtype; the fp32
masters travel with the optimizer state until the finetune is done, so a resumed run still ends with the
weights of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import conditioning as C
from .images import rgb_to_tensor
from .parameters import FINETUNE
from .profiles import SD1, resolve
from .session import Session, SessionError, save_joint_weights, settle_joint

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


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def flatten_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's state as flat tensors ``"{param index}.{name}"`` (safetensors holds no nesting)."""
    flat = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            # straight to the CPU: a clone on the GPU first would hold a second copy of both AdamW moments
            flat[f"{idx}.{key}"] = torch.as_tensor(value).detach().reshape(-1).to("cpu", copy=True)
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
        if name != "step" and value.numel() != target.numel():
            raise SessionError("the saved optimizer state does not fit this finetune (it was saved by an older "
                               "version); pass resume=False to start over")
        state.setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value.reshape(target.shape)
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})


MASTER = "master/"   # prefix of fp32 master copies among the saved resume tensors


class FP32Masters:
    """fp32 master copies of parameters kept in a lower precision: the optimizer steps the masters, the
    model's copies follow them. fp32 parameters are their own masters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]):
        self.params = params
        self.masters = {}
        for n, p in params.items():
            if p.dtype == torch.float32:
                self.masters[n] = p
            else:
                start = saved.get(MASTER + n, p.detach())
                self.masters[n] = start.to(device=p.device, dtype=torch.float32).clone().requires_grad_(True)
        self.copies = [n for n in params if self.masters[n] is not params[n]]

    def grads_to_masters(self) -> None:
        for n in self.copies:
            p = self.params[n]
            self.masters[n].grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for n in self.copies:
            self.params[n].copy_(self.masters[n])

    def resume_tensors(self) -> dict[str, torch.Tensor]:
        return {MASTER + n: self.masters[n].detach() for n in self.copies}


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


def finetune(model, session: Session, config: FinetuneConfig | None = None, callback: Callback | None = None,
             resume: bool = True, progress: bool = True, extra_sessions: Sequence[Session] = ()) -> FinetuneResult:
    """Finetune a session's items on a model and save the learned weights into the session.

    ``extra_sessions`` are finetuned jointly with it (their images' losses add up in every step, and the
    same weights are saved into each), so an item of one can be put into an image of another.
    ``callback(stage, step, loss)`` is called after every step; returning ``False`` stops after saving a
    checkpoint (resume later by calling again). With ``resume=False`` earlier weights are discarded, on disk
    only when this run's first checkpoint replaces them. A step whose loss or weights are NaN or infinite
    raises :class:`NonFiniteError` before anything of it is saved.
    """
    config = config or FinetuneConfig()
    sessions = [session, *extra_sessions]
    state, sessions = _resumable_state(session, sessions, config, resume)
    for s in sessions:  # every session is checked before any of them is changed
        s.check_model(model)
    if state is None:
        for s in sessions:  # on disk the earlier weights stay until this run's first checkpoint replaces them
            if s.has_weights:
                s.discard_weights(save=False)
    try:
        return _finetune(model, session, sessions, config, state, callback, progress)
    except BaseException:
        for s in sessions:  # the unsaved discard and token names must not reach a later save
            with contextlib.suppress(Exception):
                s.reload()
        raise
    finally:
        _clear_gradients(model)     # an interrupted backward pass must not reach the next finetune on this model


def _clear_gradients(model) -> None:
    for module in (model.unet, *(slot.encoder for slot in model.text.slots)):
        module.zero_grad(set_to_none=True)


def _finetune(model, session: Session, sessions: list[Session], config: FinetuneConfig, state: dict | None,
              callback: Callback | None, progress: bool) -> FinetuneResult:
    model.reset_unet()
    _clear_gradients(model)
    tokens = [t for s in sessions for t in s.assign_tokens(config.num_tokens)]
    model.text.add_tokens(tokens, generator=torch.Generator().manual_seed(config.seed), restart=state is None)
    saved_loss = (state or {}).get("loss", {"stage1": [], "stage2": []})
    result = FinetuneResult(loss={k: list(v) for k, v in saved_loss.items()})
    stage, start = (state["stage"], state["step"]) if state is not None else (1, 0)
    if state is not None:
        model.text.set_token_rows(session.load_weights("tokens"))
        if state.get("done") and stage == 2 and start >= config.stage2_steps:
            model.use_session(session)
            result.completed = True
            return result
    run = _Run(model, sessions, config, tokens, _encode_images(model, sessions), result,
               _weights_meta(config, sessions), callback, progress)
    if state is not None:
        run.resumed = {"optimizer": session.load_weights("optimizer"), "scaler": state.get("scaler", {}),
                       "rows": session.load_weights("tokens")}
    with _waiting_on_cpu(model, [model.vae] if config.offload_text_and_vae else []):
        if stage == 1:
            if _stage1(run, start):
                return result
            start, run.resumed = 0, {}
        result.completed = not _stage2(run, start, session.load_weights("unet") if stage == 2 else {})
    return result


@contextlib.contextmanager
def _waiting_on_cpu(model, modules):
    """Modules moved to the CPU for a while (their weights leave the GPU), then back to the model's device."""
    modules = [m for m in modules if m is not None]
    for m in modules:
        m.to("cpu")
    try:
        yield
    finally:
        for m in modules:
            m.to(model.device)


def _weights_meta(config: FinetuneConfig, sessions: Sequence[Session]) -> dict:
    meta = {"mode": "lora" if config.lora else "attn", "num_tokens": config.num_tokens,
            "joint": [{"id": s.id, "folder": str(s.folder)} for s in sessions]}
    if config.lora:
        meta["lora"] = {"rank": config.lora_rank, "alpha": float(config.lora_rank), "target_modules": LORA_TARGETS}
    return meta


def _resumable_state(session: Session, sessions: list[Session], config: FinetuneConfig,
                     resume: bool) -> tuple[dict | None, list[Session]]:
    """The saved finetune state to continue from (None to start over) and the members in their first run's
    order, brought to the newest checkpoint every member holds; refuses a mismatched resume."""
    if len({s.id for s in sessions}) != len(sessions):
        raise SessionError("the same session was given twice (or two sessions share an id, as a session and "
                           "its copy_to copy do: finetune the copy on its own)")
    if not resume:
        return None, sessions
    sessions = settle_joint(sessions)
    state = session.finetune_state
    if state is None:
        return None, sessions
    previous = FinetuneConfig(**state["config"])
    if not config.resumable_with(previous):
        raise SessionError("this session's finetune was started with other settings "
                           f"({previous}); pass the same settings, or resume=False to start over")
    if session.joint_session_ids != {s.id for s in sessions}:
        raise SessionError("this session's finetune was started with other sessions; pass the same "
                           "extra_sessions, or resume=False to start over")
    stage, step = state["stage"], state["step"]
    if stage == 2 and config.stage1_steps != previous.stage1_steps:
        raise SessionError(f"stage 1 of this session's finetune is over ({previous.stage1_steps} steps); pass "
                           f"stage1_steps={previous.stage1_steps}, or resume=False to start over")
    asked = config.stage1_steps if stage == 1 else config.stage2_steps
    if asked < step:
        raise SessionError(f"this session's finetune has done {step} steps of stage {stage}, more than the "
                           f"{asked} asked for; pass at least {step}, or resume=False to start over")
    if state.get("done") and asked > step:
        warnings.warn(f"extending a finished finetune ({step} -> {asked} stage-2 steps): its optimizer state was "
                      "dropped when it finished, so AdamW starts afresh (not the weights of one longer run)",
                      stacklevel=3)
    return state, sessions


def _encode_images(model, sessions: Sequence[Session]) -> list[_ImageData]:
    """Each image's latents (fp32), latent item map, item prompts and areas: computed once, not per step."""
    images = []
    for entry in (e for s in sessions for e in s.images):
        latents = model.encode_images(rgb_to_tensor(entry.working)).float()
        labels = C.latent_labels(model, entry.labels, len(entry.items))
        areas = np.bincount(entry.labels.ravel(), minlength=len(entry.items)).astype(float).tolist()
        images.append(_ImageData(latents, labels, [it.prompt() for it in entry.items],
                                 [it.name for it in entry.items], areas))
    return images


def _stage1(run: _Run, start: int) -> bool:
    """Learn the item tokens' embedding rows (fp32 masters; nothing else of the encoders changes)."""
    model, config = run.model, run.config
    with model.text.trainable_rows(run.tokens, run.resumed.get("rows")) as rows:
        opt = torch.optim.AdamW(rows, lr=config.stage1_lr, weight_decay=0.0)
        restore_optimizer_state(opt, run.resumed.get("optimizer", {}))

        def saved() -> dict[str, dict]:
            tokens = {f"{s}/{t}": r[j].detach().cpu().clone()
                      for s, r in enumerate(rows) for j, t in enumerate(run.tokens)}
            return {"tokens": tokens, "unet": {}, "optimizer": flatten_optimizer_state(opt)}

        stage = _Stage(1, config.stage1_steps, opt, lambda: [run.conditioning(d) for d in run.images], saved)
        return _train(run, stage, start)


def _stage2(run: _Run, start: int, saved_unet: dict[str, torch.Tensor]) -> bool:
    """Train the UNet's cross-attention q/k/v (fp32 masters of the model-dtype weights) or a LoRA (fp32),
    with the item tokens frozen and their text states computed once."""
    model, config = run.model, run.config
    if config.lora:
        model.add_lora(config.lora_rank, float(config.lora_rank), LORA_TARGETS, seed=config.seed)
        params = model.lora_parameters()
    else:
        params = model.cross_attention_parameters()
        model.remember_pristine(params)
    with torch.no_grad():
        for n, value in saved_unet.items():
            params[n].copy_(value)
    resumed = run.resumed.get("optimizer", {})
    masters = FP32Masters(params, resumed)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(masters.masters.values()), lr=config.lora_lr if config.lora else config.stage2_lr,
                            weight_decay=0.0)
    restore_optimizer_state(opt, {k: v for k, v in resumed.items() if not k.startswith(MASTER)})
    tokens = run.sessions[0].load_weights("tokens")   # stage 1's fp32 rows, as saved at its end
    with torch.no_grad():
        cached = [run.conditioning(d) for d in run.images]

    def saved() -> dict[str, dict]:
        unet = {n: p.detach() for n, p in params.items()}
        resume = {**flatten_optimizer_state(opt), **masters.resume_tensors()}
        return {"tokens": tokens, "unet": unet, "optimizer": resume}

    encoders = [slot.encoder for slot in model.text.slots] if config.offload_text_and_vae else []
    try:
        with _waiting_on_cpu(model, encoders):   # the item prompts' states are cached: no encoder runs in stage 2
            return _train(run, _Stage(2, config.stage2_steps, opt, lambda: cached, saved, masters), start)
    finally:
        for p in params.values():
            p.requires_grad_(False)


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
