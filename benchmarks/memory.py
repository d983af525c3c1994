"""The memory estimator (dedit_nb.memory) against measurements.

    python benchmarks/memory.py                 # CPU: tiny and reduced models, predicted vs the CPU allocator
    python benchmarks/memory.py --real-size     # and, with CUDA, SD 1.5 / SDXL from their configs on the GPU

On the CPU, for tiny models of every family (SD 1.x, SD 2.x, SDXL; random weights, ``build_tiny_model``) and
both stage-2 modes (q/k/v, LoRA), at 64x64 (tiny) and 192x192 (reduced: the same models where activations
outweigh everything else), each phase's rise in bytes as the meta-device prediction gives it
(``memory.predict_cpu``) and as the CPU allocator's profile measures it (``memory.measure_cpu``), with the
error. Goal: within 2%.

With CUDA, the same models in fp16 on the GPU, and with ``--real-size`` SD 1.5 at 512 and SDXL at 1024
(random weights built from the published configs on the GPU): the estimate's lower and upper bounds per
phase against ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` of the same run. Goal: the
allocated peak within 10% of the lower bound, and below the upper one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dedit_nb import memory  # noqa: E402
from dedit_nb.models import load_model  # noqa: E402
from dedit_nb.testing import build_tiny_model  # noqa: E402

FAMILIES = ["sd", "sd2", "sdxl"]
SIZES = {"tiny": 64, "reduced": 192}


def cpu_rows(folders: dict[str, Path]) -> list[float]:
    errors = []
    print(f"{'model':<14} {'mode':<9} {'phase':<8} {'predicted':>11} {'measured':>11} {'error':>7}")
    for size_name, side in SIZES.items():
        for family, folder in folders.items():
            for lora in (False, True):
                work = memory.Workload(resolution=side, items=3, lora=lora)
                measured = memory.measure_cpu(load_model(str(folder), device="cpu", dtype="fp32"), work)
                predicted = memory.predict_cpu(str(folder), work)
                for phase, value in measured.items():
                    error = (predicted[phase] - value) / value
                    errors.append(abs(error))
                    print(f"{family + ' ' + size_name:<14} {'lora' if lora else 'attention':<9} {phase:<8} "
                          f"{predicted[phase]:>11,} {value:>11,} {error:>+7.2%}", flush=True)
    return errors


def measure_cuda(model, work: memory.Workload) -> dict[str, tuple[int, int]]:
    """Each phase's max allocated and max reserved bytes on CUDA (the load phase: what is allocated now)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()   # building in fp32 then casting left blocks cached
    peaks = {"load": (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())}
    torch.cuda.reset_peak_memory_stats()

    def end(name: str) -> None:
        torch.cuda.synchronize()
        if name != memory.EDIT_BEGINS:
            peaks[name] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    memory.run_workload(model, work, end)
    return peaks


def cuda_rows(models: dict[str, object], works: dict[str, memory.Workload]) -> list[float]:
    errors = []
    capability = torch.cuda.get_device_capability()
    print(f"\nCUDA ({torch.cuda.get_device_name()}, capability {capability}); GiB")
    print(f"{'model':<22} {'phase':<8} {'lower':>7} {'alloc':>7} {'error':>7} {'upper':>7} {'reserved':>8}")
    for name, build in models.items():
        model = build()
        work = works[name]
        predicted = memory.estimate(model, work=work, capability=capability)
        measured = measure_cuda(model, work)
        for phase in predicted.phases:
            allocated, reserved = measured[phase.name]
            error = (phase.lower - allocated) / allocated
            errors.append(abs(error))
            print(f"{name:<22} {phase.name:<8} {phase.lower / memory.GiB:7.3f} {allocated / memory.GiB:7.3f} "
                  f"{error:>+7.2%} {phase.upper / memory.GiB:7.3f} {reserved / memory.GiB:8.3f}", flush=True)
        del model
        torch.cuda.empty_cache()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-size", action="store_true", help="with CUDA: SD 1.5 and SDXL from their configs")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {f: build_tiny_model(f, Path(tmp) / f) for f in FAMILIES}
        if not args.skip_cpu:
            errors = cpu_rows(folders)
            print(f"CPU: largest error {max(errors):.2%} over {len(errors)} phases ({time.time() - start:.0f} s)")
        if torch.cuda.is_available():
            models, works = {}, {}
            for family, folder in folders.items():
                for lora in (False, True):
                    name = f"{family} tiny {'lora' if lora else 'attention'}"
                    models[name] = lambda folder=folder: load_model(str(folder), device="cuda", dtype="fp16")
                    works[name] = memory.Workload(resolution=64, items=3, lora=lora)
            if args.real_size:
                for family, side in (("sd15", 512), ("sdxl", 1024)):
                    for lora, checkpointing in ((False, False), (True, True)):
                        name = f"{family} {'lora+gc' if lora else 'attention'}"
                        models[name] = lambda family=family: memory.model_from_configs(family, "fp16", "cuda")
                        works[name] = memory.Workload(resolution=side, items=6, lora=lora,
                                                      gradient_checkpointing=checkpointing)
            errors = cuda_rows(models, works)
            print(f"CUDA: largest error of the lower bound {max(errors):.2%} over {len(errors)} phases")
        else:
            print("no CUDA device: the GPU comparison is skipped")


if __name__ == "__main__":
    main()
