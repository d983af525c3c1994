"""The live storages of meta tensors, counted as device memory by a dispatch mode (:class:`DeviceMemory`)."""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .allocator import CachingAllocator, MiB

aten = torch.ops.aten


def _discrete(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)



_FACTORIES = {aten.empty.memory_format, aten.empty_strided.default, aten.zeros.default, aten.ones.default,
              aten.full.default, aten.arange.default, aten.arange.start, aten.arange.start_step,
              aten.randint.low, aten.randint.default, aten.scalar_tensor.default}
_CONVOLUTIONS = {aten.convolution.default, aten.convolution_backward.default}
# what live bytes were made as: adopted weights; in an optimizer step (AdamW's moments and temporaries); in
# the backward pass (gradients, recomputed activations); anywhere else (activations, fp32 masters, caches)
KINDS = ("weights", "forward", "backward", "optimizer")
# comparisons true of finite values (isfinite is x == x and |x| != inf): checks for non-finite values pass
_TRUE_OF_FINITE_VALUES = {aten.isfinite.default, aten.eq.Tensor, aten.ne.Scalar}


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


class DeviceMemory(TorchDispatchMode):
    """Counts the device memory that the ops run under it would hold, treating the ``meta`` device as the GPU.

    Every meta storage is allocated in a :class:`CachingAllocator` when an op creates it and freed when its
    last reference goes. ``adopt`` counts tensors that existed before (the weights). Integer and bool
    results stay real CPU tensors; copies of meta tensors to the CPU give placeholders (zeros, or
    uninitialised for big ones: never written, so never paged in). ``workspace`` is the cuDNN allowance per
    convolution, as a share of its input + output bytes, by dtype.
    """

    def __init__(self, workspace: dict[torch.dtype, float] | None = None, device: str = "meta"):
        super().__init__()
        self.device = device   # whose storages count: "cpu" measures a real run the same way
        self.allocator = CachingAllocator()
        self.workspace = {torch.float16: 1.5, torch.bfloat16: 1.5, torch.float32: 1.0} if workspace is None \
            else workspace
        self._live: dict[int, tuple[int, int]] = {}   # storage key -> allocator block
        self.tensor_bytes = self.peak_tensor_bytes = 0
        self.peak_with_workspace = 0
        self._kind_of: dict[int, str] = {}   # storage key -> KINDS entry it was made as
        self.bytes_by_kind = dict.fromkeys(KINDS, 0)
        self.at_peak: tuple[dict[str, int], str] = (dict(self.bytes_by_kind), "")   # by kind, and the op, at the peak
        self._op = ""
        self._in_optimizer = False
        self._hooks = []

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self._hooks = [register_optimizer_step_pre_hook(lambda *a: setattr(self, "_in_optimizer", True)),
                       register_optimizer_step_post_hook(lambda *a: setattr(self, "_in_optimizer", False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    # --- accounting ----------------------------------------------------------------------------------
    def adopt(self, tensors) -> None:
        """Count tensors made before (a model's weights) from now on."""
        for t in tensors:
            self._track(t, weight=True)

    def _track(self, t, weight: bool = False) -> None:
        if not (isinstance(t, torch.Tensor) and t.device.type == self.device):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = (self.allocator.malloc(nbytes), nbytes)
        self.tensor_bytes += nbytes
        if weight:
            kind = "weights"
        elif self._in_optimizer:
            kind = "optimizer"
        elif torch._C._current_autograd_node() is not None:
            kind = "backward"
        else:
            kind = "forward"
        self._kind_of[key] = kind
        self.bytes_by_kind[kind] += nbytes
        if self.tensor_bytes > self.peak_tensor_bytes:
            self.peak_tensor_bytes = self.tensor_bytes
            self.at_peak = (dict(self.bytes_by_kind), self._op)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        block, nbytes = self._live.pop(key)
        self.allocator.free(block)
        self.tensor_bytes -= nbytes
        self.bytes_by_kind[self._kind_of.pop(key)] -= nbytes

    @property
    def allocated(self) -> int:
        return self.allocator.allocated

    def reset_peaks(self) -> None:
        """Start a new phase: peaks from what is live now."""
        a = self.allocator
        a.peak_allocated, a.peak_reserved, a.peak_in_use = a.allocated, a.reserved, a.in_use
        self.peak_tensor_bytes = self.tensor_bytes
        self.peak_with_workspace = a.in_use
        self.at_peak = (dict(self.bytes_by_kind), "")

    @property
    def lower(self) -> int:
        return self.allocator.peak_allocated

    @property
    def upper(self) -> int:
        return max(self.allocator.peak_in_use, self.peak_with_workspace)

    # --- dispatch ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _is_meta(args[0]):
            return False if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default:
            placeholder = self._cross_device_copy(args[0], kwargs)
            if placeholder is not None:
                return placeholder
        if func is aten.copy_.default and not _is_meta(args[0]) and _is_meta(args[1]):
            return args[0]            # a CPU tensor filled from a meta one: its values are not known
        if func in _FACTORIES and _is_meta_device(kwargs.get("device")) and _discrete(_dtype_of(func, args, kwargs)):
            kwargs = {**kwargs, "device": torch.device("cpu")}
            return func(*args, **kwargs)
        flat = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(_is_meta(a) for a in flat):
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        if func in _CONVOLUTIONS:
            self._workspace(func, args)
        self._op = func.__name__
        out = func(*args, **kwargs)
        if any(_is_meta(a) for a in flat) and not func._schema.is_mutable:
            fill = 1 if func in _TRUE_OF_FINITE_VALUES else 0
            out = tree_map(lambda x: _real_discrete(x, fill), out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _cross_device_copy(self, src: torch.Tensor, kwargs: dict):
        device, dtype = kwargs.get("device"), kwargs.get("dtype") or src.dtype
        if _is_meta(src) and device is not None and torch.device(device).type == "cpu":
            return _placeholder(src.shape, dtype)
        if not _is_meta(src) and _is_meta_device(device) and _discrete(dtype):
            return src.to(dtype=dtype, copy=True)
        return None

    def _workspace(self, func, args) -> None:
        x, w = args[0], args[1]
        share = self.workspace.get(x.dtype, 1.0)
        if func is aten.convolution.default:
            out_bytes = _conv_output_numel(x, w, args[3], args[4], args[5]) * x.element_size()
            nbytes = int(share * (x.numel() * x.element_size() + out_bytes))
        else:   # backward: the output gradient in, the input gradient out
            nbytes = int(share * (args[0].numel() + args[1].numel()) * x.element_size())
        if nbytes:
            block = self.allocator.malloc(nbytes)
            self.peak_with_workspace = max(self.peak_with_workspace, self.allocator.in_use)
            self.allocator.free(block)


def _is_meta_device(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _dtype_of(func, args, kwargs) -> torch.dtype:
    dtype = kwargs.get("dtype")
    if dtype is not None:
        return dtype
    if func is aten.full.default:
        return torch.int64 if isinstance(args[1], (int, bool)) and not isinstance(args[1], float) else torch.float32
    if func in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        return torch.int64 if all(isinstance(a, int) for a in args) else torch.float32
    if func in (aten.randint.low, aten.randint.default):
        return torch.int64
    return torch.get_default_dtype()


def _to_meta(x):
    if isinstance(x, torch.Tensor) and not _is_meta(x):
        return x.to("meta")
    return x


def _real_discrete(x, fill: int = 0):
    """A discrete meta result as a real CPU tensor, as if every value were finite (see
    :data:`_TRUE_OF_FINITE_VALUES`; else zeros: nothing found)."""
    if _is_meta(x) and _discrete(x.dtype):
        return torch.full(x.shape, fill, dtype=x.dtype)
    return x


def _placeholder(shape, dtype) -> torch.Tensor:
    numel = math.prod(shape)
    if numel * torch.empty((), dtype=dtype).element_size() > 64 * MiB:
        return torch.empty(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _conv_output_numel(x, w, stride, padding, dilation) -> int:
    n = x.shape[0] * w.shape[0]
    for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation):
        n *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return n
