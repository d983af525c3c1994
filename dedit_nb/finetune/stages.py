"""The two stages of a finetune and its entry point, :func:`finetune`."""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from .. import conditioning as C
from ..callbacks import check_callback
from ..images import rgb_to_tensor
from ..session import Session
from .config import LORA_TARGETS, Callback, FinetuneConfig, FinetuneResult
from .loop import _ImageData, _Run, _Stage, _train
from .per_item import PerItemStage
from .state import (MASTER, FP32Masters, _resumable_state, _weights_meta, flatten_optimizer_state,
                    restore_optimizer_state)
from .stopping import finished_at


def finetune(model, session: Session, config: FinetuneConfig | None = None, callback: Callback | None = None,
             resume: bool = True, progress: bool = True, extra_sessions: Sequence[Session] = ()) -> FinetuneResult:
    """Finetune a session's items on a model and save the learned weights into the session.

    ``extra_sessions`` are finetuned jointly with it (their images' losses add up in every step, and the
    same weights are saved into each), so an item of one can be put into an image of another.
    ``callback(run, stage, step, callback_kwargs) -> dict`` is called after every step, in diffusers'
    ``callback_on_step_end`` style, with the stage's name ("stage1", "stage2") and ``{"loss": ...}``;
    ``run.stop()`` (:class:`FinetuneRun`) stops after saving a checkpoint (resume later by calling
    again). With ``resume=False`` earlier weights are discarded, on disk
    only when this run's first checkpoint replaces them. A step whose loss or weights are NaN or infinite
    raises :class:`NonFiniteError` before anything of it is saved.
    """
    config = config or FinetuneConfig()
    if callback is not None:
        check_callback(callback, "callback(run, stage, step, callback_kwargs)", "run.stop() ends the finetune",
                       None, "stage1", 0, {})
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
    for module in (model.unet, *(slot.encoder for slot in model.conditioner.slots)):
        module.zero_grad(set_to_none=True)


def _finetune(model, session: Session, sessions: list[Session], config: FinetuneConfig, state: dict | None,
              callback: Callback | None, progress: bool) -> FinetuneResult:
    model.delta.reset_unet()
    _clear_gradients(model)
    tokens = [t for s in sessions for t in s.assign_tokens(config.num_tokens)]
    model.conditioner.add_tokens(tokens, generator=torch.Generator().manual_seed(config.seed), restart=state is None)
    if state is None and config.init_tokens_from_name:
        _start_tokens_from_names(model, sessions)
    saved = state or {}
    result = FinetuneResult(loss={k: list(v) for k, v in saved.get("loss", {"stage1": [], "stage2": []}).items()},
                            validation={k: [list(v) for v in saved.get("validation", {}).get(k, [])]
                                        for k in ("stage1", "stage2")},
                            stopped=dict(saved.get("stopped", {})))
    stage, start = (state["stage"], state["step"]) if state is not None else (1, 0)
    if state is not None:
        model.conditioner.set_token_rows(session.load_weights("tokens"))
        if state.get("done") and stage == 2 and config.stage2_steps <= finished_at(state, config.stop_when):
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


def _start_tokens_from_names(model, sessions: Sequence[Session]) -> None:
    """Textual inversion's initializer token: every token of an item starts from the mean embedding of its
    name's words, in each encoder whose tokenizer knows them all (elsewhere it keeps its random draw)."""
    items = [it for s in sessions for e in s.images for it in e.items]
    for slot in model.conditioner.slots:
        table = slot.embedding().weight
        unknown = getattr(slot.tokenizer, "unk_token_id", None)
        for item in items:
            words = slot.tokenizer(item.name, add_special_tokens=False).input_ids
            if words and unknown not in words:
                rows = slot.tokenizer.convert_tokens_to_ids(item.tokens)
                with torch.no_grad():
                    table[rows] = table[words].float().mean(0).to(table)


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
    with model.conditioner.trainable_rows(run.tokens, run.resumed.get("rows")) as rows:
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
    per_item = PerItemStage(run, saved_unet) if config.per_item else None
    if per_item is not None:
        params, saved_unet = per_item.parameters, per_item.stacked_saved
    elif config.lora:
        model.delta.add_lora(config.lora_rank, float(config.lora_rank), LORA_TARGETS, seed=config.seed)
        params = model.delta.lora_parameters()
    else:
        params = model.delta.cross_attention_parameters()
        model.delta.remember_pristine(params)
    with torch.no_grad():
        for n, value in saved_unet.items():
            params[n].copy_(value)
    resumed = run.resumed.get("optimizer", {})
    masters = FP32Masters(params, resumed)
    for p in params.values():
        p.requires_grad_(True)
    lr = config.lora_lr if config.lora or config.per_item else config.stage2_lr
    opt = torch.optim.AdamW(list(masters.masters.values()), lr=lr, weight_decay=0.0)
    restore_optimizer_state(opt, {k: v for k, v in resumed.items() if not k.startswith(MASTER)})
    tokens = run.sessions[0].load_weights("tokens")   # stage 1's fp32 rows, as saved at its end
    with torch.no_grad():
        cached = [run.conditioning(d) for d in run.images]
    if per_item is not None:
        cached = per_item.route(cached)

    def saved() -> dict[str, dict]:
        unet = per_item.saved() if per_item is not None else {n: p.detach() for n, p in params.items()}
        resume = {**flatten_optimizer_state(opt), **masters.resume_tensors()}
        return {"tokens": tokens, "unet": unet, "optimizer": resume}

    encoders = [slot.encoder for slot in model.conditioner.slots] if config.offload_text_and_vae else []
    try:
        with _waiting_on_cpu(model, encoders):   # the item prompts' states are cached: no encoder runs in stage 2
            return _train(run, _Stage(2, config.stage2_steps, opt, lambda: cached, saved, masters), start)
    finally:
        for p in params.values():
            p.requires_grad_(False)
