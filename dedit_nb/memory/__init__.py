"""GPU memory known before training: the peak CUDA memory of each phase, predicted on any machine.

The model is built on PyTorch's ``meta`` device from its configs (no weights, no GPU) and the project's own
finetune and edit code runs on it, under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that
counts the bytes of every live storage from the op that creates it to its last reference (a weakref
finalizer on the storage). What runs is what CUDA would run:

- attention goes to the kernel CUDA picks for the card and dtype: memory-efficient attention (it keeps a
  log-sum-exp, not the attention matrix, for the backward pass) for fp16 and fp32, and for bf16 on cards of
  compute capability 8 or more; bf16 on a T4 (7.5) has no fused kernel and runs the math path, which holds
  the attention matrix;
- AdamW takes its CUDA implementation (``foreach``, with its temporaries);
- integer and bool tensors stay real CPU tensors, so data-dependent code (item layouts, token ids) runs;
  ``.item()`` of a meta tensor reads 0 (a finite loss, no overflow for the gradient scaler);
- a simulation of CUDA's caching allocator (blocks rounded to 512 B, small blocks in 2 MiB segments,
  1-10 MiB ones in 20 MiB segments, larger ones in segments rounded to 2 MiB, best fit with splitting)
  turns the allocations into reserved memory;
- cuDNN convolutions get a transient workspace of 1.5 x (input + output) bytes in half precision, 1 x in
  fp32 (a fitted allowance: cuDNN picks its algorithm at run time).

The lower bound is the peak of allocated tensor bytes (what ``torch.cuda.max_memory_allocated`` reports);
the upper bound is the peak of reserved memory in segments that hold a live block, with the workspaces
(on running out, the allocator gives wholly free cached segments back and retries, so those do not count;
what stays is rounding, fragmentation and the workspaces). The CUDA context itself (about 0.3-0.5 GiB) is
outside both, as ``mem_get_info``'s free memory already excludes it.

The package, bottom to top (each module imports only those before it): :mod:`.allocator` (the caching
allocator), :mod:`.tracker` (the dispatch mode counting live storages), :mod:`.configs` (the families'
configs, models on the meta device), :mod:`.kernels` (attention and AdamW as CUDA runs them),
:mod:`.workload` (the run, the estimate and its checks against a CPU allocator) and :mod:`.fit` (memory
options chosen to fit a device); ``python -m dedit_nb.memory`` prints an estimate (:mod:`.__main__`).
"""
from .allocator import CachingAllocator, GiB, MiB
from .configs import FAMILIES, meta_like, model_from_configs
from .fit import FINETUNE_OPTIONS, MemoryFitError, available_bytes, fit_edit, fit_finetune
from .kernels import T4, attention_kernel, routed_attention
from .tracker import KINDS, DeviceMemory
from .workload import (EDIT_BEGINS, PHASES, Estimate, Phase, Workload, _synthetic_session, estimate, measure_cpu,
                       predict_cpu, run_workload)

__all__ = ["GiB", "MiB", "CachingAllocator", "FAMILIES", "meta_like", "model_from_configs", "FINETUNE_OPTIONS",
           "MemoryFitError", "available_bytes", "fit_edit", "fit_finetune", "T4", "attention_kernel",
           "routed_attention", "KINDS", "DeviceMemory", "EDIT_BEGINS", "PHASES", "Estimate", "Phase", "Workload",
           "estimate", "measure_cpu", "predict_cpu", "run_workload"]
