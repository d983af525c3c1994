"""The estimate: the project's finetune and edit code run on a model under :class:`~.tracker.DeviceMemory`,
the peak of each phase, and the same workload measured on a real (CPU) allocator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .allocator import GiB
from .configs import meta_like, model_from_configs
from .kernels import T4, _cuda_optimizers, attention_kernel, routed_attention
from .tracker import DeviceMemory

if TYPE_CHECKING:
    from ..models import DEditModel


@dataclass
class Phase:
    """Predicted peak of one phase, in bytes: ``lower`` (tensors only), ``upper`` (reserved memory in use, with
    the convolution workspaces), the weights' bytes at the peak, and what is live there by :data:`KINDS`."""

    name: str
    lower: int
    upper: int
    weights: int
    dominant: str

    def row(self) -> str:
        return f"{self.name:<10} {self.lower / GiB:7.2f} {self.upper / GiB:7.2f}   {self.dominant}"


@dataclass
class Estimate:
    """The predicted peaks of the phases of a run (load, stage 1, stage 2, edit) and what was assumed."""

    phases: list[Phase]
    settings: dict = field(default_factory=dict)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def table(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines = [f"predicted peak CUDA memory ({head})", f"{'phase':<10} {'lower':>7} {'upper':>7}   GiB; live at the lower peak, largest first"]
        return "\n".join(lines + [p.row() for p in self.phases])

    def __str__(self) -> str:
        return self.table()


def _dominant(memory: DeviceMemory) -> str:
    by_kind, op = memory.at_peak
    largest_first = sorted(by_kind.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{kind} {nbytes / GiB:.2f}" for kind, nbytes in largest_first if nbytes >= 0.005 * GiB)
    return f"{parts or 'under 0.01'} GiB" + (f" (at {op})" if op else "")


def _phase(name: str, memory: DeviceMemory) -> Phase:
    return Phase(name, memory.lower, memory.upper, memory.at_peak[0]["weights"], _dominant(memory))


def _synthetic_session(folder, width: int, height: int, items: int):
    """A session of one image at the working size ``width x height`` with ``items`` vertical stripes as items."""
    import numpy as np
    from ..session import Session
    labels = (np.arange(width)[None, :] * items // width).repeat(height, 0)
    image = np.zeros((height, width, 3), np.uint8)
    return Session.create(folder, image, resolution=min(width, height), multiple=8, labels=labels,
                          item_names=[f"thing{k}" for k in range(items)], save=False)


@dataclass
class Workload:
    """What the estimate runs: a finetune of one image of ``resolution`` pixels a side (``width`` x ``height``
    when given) with ``items`` items (two steps a stage: the second holds the optimizer state), then an edit
    of ``num_images`` images with classifier-free guidance when ``guidance`` > 1 (two steps, then the
    decode). ``finetune=False`` runs the edit only."""

    resolution: int = 512
    items: int = 6
    lora: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 1
    guidance: float = 5.0
    num_images: int = 1
    vae_tiling: bool = False
    width: int | None = None
    height: int | None = None
    finetune: bool = True
    offload_text_and_vae: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.width or self.resolution, self.height or self.resolution


PHASES = ("load", "stage 1", "stage 2", "edit")
EDIT_BEGINS = "edit begins"   # the finetune has returned and let go of its optimizer, masters and caches


def run_workload(model: DEditModel, work: Workload, on_phase) -> None:
    """Run the project's finetune and edit code on ``model`` (any device), calling ``on_phase(name)`` at the
    end of ``stage 1``, ``stage 2`` (the finetune's checkpoint saves, replaced: nothing is written) and
    ``edit``, and with :data:`EDIT_BEGINS` when the edit's phase starts."""
    import importlib
    import tempfile
    from unittest import mock
    F = importlib.import_module("..finetune", __package__)
    loop = importlib.import_module("..finetune.loop", __package__)   # where the finetune saves its checkpoints
    from ..conditioning import encode_items, latent_labels
    from ..masks import edit_regions
    from ..sampler import SamplingConfig, masked_sample

    ends = iter(PHASES[1:] if work.finetune else PHASES[-1:])
    config = F.FinetuneConfig(stage1_steps=2, stage2_steps=2, checkpoint_every=1000, lora=work.lora,
                              batch_size=work.batch_size, gradient_checkpointing=work.gradient_checkpointing,
                              offload_text_and_vae=work.offload_text_and_vae)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(loop, "save_joint_weights",
                                                                 lambda *args: on_phase(next(ends))):
        session = _synthetic_session(f"{tmp}/session", *work.size, work.items)
        if work.finetune:
            F.finetune(model, session, config, resume=False, progress=False)
    if work.vae_tiling:
        model.enable_vae_tiling()
    on_phase(EDIT_BEGINS)
    entry = session.images[0]
    cond = encode_items(model, [it.prompt() for it in entry.items], [config.item_prompt_length] * work.items)
    masked_sample(model, cond, latent_labels(model, entry.labels, work.items), entry.working,
                  edit_regions(entry.labels == 0, 10),
                  SamplingConfig(steps=2, guidance=work.guidance, num_images=work.num_images), progress=False)
    on_phase(next(ends))


def estimate(model: str | DEditModel = "sd15", resolution: int = 512, dtype: str | torch.dtype = "fp16",
             lora: bool = False, gradient_checkpointing: bool = False, batch_size: int = 1, items: int = 6,
             guidance: float = 5.0, num_images: int = 1, capability: tuple[int, int] = T4,
             vae_tiling: bool = False, work: Workload | None = None) -> Estimate:
    """Predict the peak CUDA memory of each phase of a D-Edit run: ``load`` (the weights), ``stage 1`` and
    ``stage 2`` of the finetune (with a checkpoint save), and ``edit`` (an edit with classifier-free guidance
    when ``guidance`` > 1, then the decode). ``model``: ``sd15``, ``sd21``, ``sdxl``, a local diffusers
    folder (built in ``dtype``), or a loaded model (its architecture and dtypes); one square image of
    ``resolution`` pixels a side with ``items`` items, or ``work`` for all of these settings;
    ``capability``: the GPU's compute capability (it decides the attention kernel, see
    :func:`attention_kernel`)."""
    work = work or Workload(resolution, items, lora, gradient_checkpointing, batch_size, guidance, num_images,
                            vae_tiling)
    built = model_from_configs(model, dtype) if isinstance(model, str) else meta_like(model)
    kernel = attention_kernel(built.dtype, capability)
    memory, phases = DeviceMemory(), []

    def end(name: str) -> None:
        if name != EDIT_BEGINS:
            phases.append(_phase(name, memory))
        memory.reset_peaks()

    with memory, routed_attention(kernel), _cuda_optimizers():
        memory.adopt(_weights(built))
        end("load")
        run_workload(built, work, end)
    width, height = work.size
    settings = {"model": built.model_id, "size": f"{width}x{height}", "dtype": str(built.dtype).replace("torch.", ""),
                "mode": "lora" if work.lora else "attention", "gradient_checkpointing": work.gradient_checkpointing,
                "batch_size": work.batch_size, "items": work.items, "attention": kernel}
    return Estimate(phases, settings)


def _weights(model: DEditModel):
    return (t for m in model.modules() for t in [*m.parameters(), *m.buffers()])


# ---------------------------------------------------------------------------------------------------------
def predict_cpu(folder: str, work: Workload) -> dict[str, int]:
    """How far above its starting level each phase of ``work`` peaks, in bytes, predicted on the meta device
    for a run on a CPU in fp32 (CPU attention kernel, AdamW's CPU default)."""
    built = model_from_configs(str(folder), "fp32")
    memory, peaks = DeviceMemory(), {}

    def end(name: str) -> None:
        if name != EDIT_BEGINS:
            peaks[name] = memory.peak_tensor_bytes - start[0]
        memory.reset_peaks()
        start[0] = memory.tensor_bytes

    with memory, routed_attention("cpu"):
        memory.adopt(_weights(built))
        start = [memory.tensor_bytes]
        run_workload(built, work, end)
    return peaks


def measure_cpu(model: DEditModel, work: Workload) -> dict[str, int]:
    """How far above its starting level each phase of ``work`` peaks on the CPU allocator, in bytes, for a
    loaded (CPU) model, read from the torch profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_workload(model, work, lambda name: record_function(f"dedit_nb.memory:{name}").__enter__().__exit__(
            None, None, None))
    events = prof.profiler.kineto_results.events()
    ends = sorted((e.start_ns(), e.name().split(":", 1)[1]) for e in events
                  if e.name().startswith("dedit_nb.memory:"))
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks, level, peak, start, i = {}, 0, 0, 0, 0
    for time, name in ends:
        while i < len(changes) and changes[i][0] <= time:
            level += changes[i][1]
            peak = max(peak, level)
            i += 1
        if name != EDIT_BEGINS:
            peaks[name] = peak - start
        start = peak = level
    return peaks
