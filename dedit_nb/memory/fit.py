"""Fitting a run into the device's free memory: the finetune's and the edits' memory options, chosen in order."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .allocator import GiB
from .workload import Estimate, Workload, estimate

if TYPE_CHECKING:
    from ..models import DEditModel
    from ..session import Session

FINETUNE_OPTIONS = ("gradient checkpointing", "LoRA", "a smaller batch", "the text encoders and VAE off the GPU "
                    "between uses")


class MemoryFitError(RuntimeError):
    """A run predicted not to fit the device's free memory."""


def available_bytes(device) -> int | None:
    """What a CUDA device can still give: free memory plus what PyTorch has cached but not allocated; None
    elsewhere (CPU and MPS memory is not checked)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _session_workload(sessions, config, **kwargs) -> Workload:
    """The largest image of the sessions, with the most items, under a finetune config."""
    entries = [e for s in sessions for e in s.images]
    width, height = max((e.size for e in entries), key=lambda wh: wh[0] * wh[1])
    return Workload(items=max(len(e.items) for e in entries), lora=config.lora, batch_size=config.batch_size,
                    gradient_checkpointing=config.gradient_checkpointing, width=width, height=height,
                    offload_text_and_vae=config.offload_text_and_vae, **kwargs)


def _finetune_candidates(config, resuming: bool = False):
    """``(config, what was turned on)``: the config as asked, then with each memory option turned on in the
    stated order. A finetune to resume may only change what does not change its result (checkpointing, where
    the text encoders and VAE wait)."""
    from dataclasses import replace
    yield config, []
    chosen = []
    if not config.gradient_checkpointing:
        config = replace(config, gradient_checkpointing=True)
        chosen.append("gradient checkpointing")
        yield config, list(chosen)
    if not resuming:
        if not config.lora:
            config = replace(config, lora=True)
            chosen.append("LoRA")
            yield config, list(chosen)
        if config.batch_size > 1:
            while config.batch_size > 1:
                config = replace(config, batch_size=config.batch_size // 2)
                yield config, chosen + [f"batch_size={config.batch_size}"]
            chosen.append("batch_size=1")
    if not config.offload_text_and_vae:
        config = replace(config, offload_text_and_vae=True)
        yield config, chosen + ["text encoders and VAE on the CPU between uses"]


def _needed(estimate: Estimate, phases) -> tuple[int, str]:
    """The most any of ``phases`` needs above the weights already loaded, and that phase's name."""
    weights = estimate.phase("load").lower
    phase = max((estimate.phase(p) for p in phases), key=lambda p: p.upper)
    return phase.upper - weights, phase.name


def fit_finetune(model: DEditModel, sessions: Sequence[Session], config=None, auto_memory: bool = True,
                 resume: bool = True, capability: tuple[int, int] | None = None):
    """Predict a finetune's peak memory on ``model``'s CUDA device (:func:`estimate` of its largest image) and
    make it fit: returns ``(config, line)``, the config to train with and one line saying what was predicted
    and chosen. When it does not fit the device's free memory, ``auto_memory=True`` turns on gradient
    checkpointing, then LoRA, then halves the batch, then keeps the text encoders and VAE on the CPU between
    uses, until it fits (a finetune to resume keeps the settings that change its result: LoRA and the batch),
    and turns on VAE tiling for the edits when they would not fit;
    ``auto_memory=False`` raises :class:`MemoryFitError` naming those options. Other devices are not checked
    (the line says so; ``python -m dedit_nb.memory`` predicts a GPU's peak from anywhere)."""
    from ..finetune import FinetuneConfig
    sessions = list(sessions) if isinstance(sessions, (list, tuple)) else [sessions]
    config = config or FinetuneConfig()
    free = available_bytes(model.device)
    if free is None:
        return config, f"memory: {model.device.type} memory is not checked (python -m dedit_nb.memory predicts a " \
                       "GPU's peak)"
    capability = capability or torch.cuda.get_device_capability(model.device)
    settled = resume and sessions[0].finetune_state is not None
    first = None
    for candidate, chosen in _finetune_candidates(config, resuming=settled):
        predicted = estimate(model, work=_session_workload(sessions, candidate), capability=capability)
        needed, phase = _needed(predicted, ("stage 1", "stage 2"))
        first = first or (needed, phase)
        if needed <= free:
            break
        if not auto_memory:
            raise MemoryFitError(
                f"the finetune's {first[1]} is predicted to need {_gib(first[0])} more than the loaded weights, "
                f"but {model.device} has {_gib(free)} free; turn on {', '.join(FINETUNE_OPTIONS)} "
                "(FinetuneConfig(gradient_checkpointing=True, lora=True, batch_size=..., offload_text_and_vae=True)), "
                "or auto_memory=True "
                "to choose them in that order")
    else:
        fix = "resume=False to start over with other settings, " if settled else ""
        raise MemoryFitError(f"even with {', '.join(chosen) or 'every memory option'} the finetune's {phase} is "
                             f"predicted to need {_gib(needed)} more than the loaded weights, but {model.device} "
                             f"has {_gib(free)} free; use {fix}a smaller working size (01's resolution) or a "
                             "larger GPU")
    line = f"memory: {phase} predicted at {_gib(needed)} above the weights, {_gib(free)} free on {model.device}"
    line += f"; chose {', '.join(chosen)}" if chosen else "; fits as asked"
    edit_needed, _ = _needed(predicted, ("edit",))
    if edit_needed > free:
        if not auto_memory:
            raise MemoryFitError(f"the reconstruction edit is predicted to need {_gib(edit_needed)} above the weights "
                                 f"but {model.device} has {_gib(free)} free; call model.enable_vae_tiling(), or "
                                 "auto_memory=True")
        model.enable_vae_tiling()
        line += "; VAE tiling for the edits"
    return candidate, line


def fit_edit(model: DEditModel, session: Session, guidance: float = 5.0, num_images: int = 1, auto_memory: bool = True,
             capability: tuple[int, int] | None = None) -> str:
    """The same before edits: predict an edit's peak on ``model``'s CUDA device and, when it does not fit, turn
    on VAE tiling (``auto_memory=True``; slicing is always on) or raise :class:`MemoryFitError` naming it.
    Returns one line saying what was predicted and chosen."""
    from ..finetune import FinetuneConfig
    free = available_bytes(model.device)
    if free is None:
        return f"memory: {model.device.type} memory is not checked"
    capability = capability or torch.cuda.get_device_capability(model.device)
    work = _session_workload([session], FinetuneConfig(), guidance=guidance, num_images=num_images, finetune=False)
    needed, _ = _needed(estimate(model, work=work, capability=capability), ("edit",))
    line = f"memory: an edit predicted at {_gib(needed)} above the weights, {_gib(free)} free on {model.device}"
    if needed <= free:
        return line + "; fits"
    if not auto_memory:
        raise MemoryFitError(line + "; call model.enable_vae_tiling(), or pass auto_memory=True")
    model.enable_vae_tiling()
    return line + "; VAE tiling on"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"
