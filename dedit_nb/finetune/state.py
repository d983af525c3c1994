"""What a finetune checkpoints so that it can resume: the optimizer state as flat tensors, the fp32 masters
of half-precision weights, and the checks of a resume against the saved finetune state."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..session import Session, SessionError, settle_joint
from .config import LORA_TARGETS, FinetuneConfig


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
