"""Where a model runs and in which dtype: the given device, else CUDA, MPS, CPU; fp16 on CUDA, fp32 elsewhere."""
from __future__ import annotations

import warnings

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA, else Apple MPS, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (fp16 matmuls on a CPU are slow and lossy)."""
    if isinstance(dtype, str):
        try:
            dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                     "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use 'fp32', 'fp16' or 'bf16'") from None
    if dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            warnings.warn(f"bf16 on this GPU (compute capability {capability[0]}.{capability[1]}) has no "
                          "memory-efficient attention kernel: attention holds its whole score matrix, which "
                          "doubles SD 1.5's training peak at 512 (3.1 -> 6.3 GiB predicted); use dtype='fp16' here",
                          stacklevel=2)
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32
