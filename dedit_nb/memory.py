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
"""
from __future__ import annotations

import bisect
import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
MiB = 2 ** 20
GiB = 2 ** 30
T4 = (7, 5)   # compute capability of Colab's smallest GPU: the assumption unless told otherwise


def _discrete(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


# ---------------------------------------------------------------------------------------------------------
# CUDA's caching allocator, simulated
# ---------------------------------------------------------------------------------------------------------

class CachingAllocator:
    """Allocated and reserved bytes as CUDA's caching allocator would have them (segments are never given
    back to the device: reserved only grows, as without ``empty_cache``)."""

    SMALL = MiB                   # requests up to this size share 2 MiB segments
    SMALL_SEGMENT = 2 * MiB
    MEDIUM_SEGMENT = 20 * MiB     # requests below 10 MiB get a 20 MiB segment
    ROUND_LARGE = 2 * MiB

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        # reserved memory in segments holding at least one block: what a device must have, since on running
        # out the allocator gives wholly free cached segments back and retries
        self.in_use = self.peak_in_use = 0
        self._free = {True: [], False: []}   # per pool (small or not): sorted (size, segment, offset)
        self._segments: list[tuple[bool, list[int], dict[int, list]]] = []   # (small, offsets, offset -> [size, free])
        self._segment_blocks: list[list[int]] = []                            # per segment: [size, blocks in use]

    @staticmethod
    def rounded(nbytes: int) -> int:
        return max(512, -(-nbytes // 512) * 512)

    def malloc(self, nbytes: int) -> tuple[int, int]:
        """A block for ``nbytes``: best fit among the free blocks of its pool, else a new segment."""
        size = self.rounded(nbytes)
        small = size <= self.SMALL
        free = self._free[small]
        i = bisect.bisect_left(free, (size, -1, -1))
        if i < len(free):
            block_size, segment, offset = free.pop(i)
        else:
            if small:
                block_size = self.SMALL_SEGMENT
            elif size < 10 * MiB:
                block_size = self.MEDIUM_SEGMENT
            else:
                block_size = -(-size // self.ROUND_LARGE) * self.ROUND_LARGE
            segment, offset = len(self._segments), 0
            self._segments.append((small, [0], {0: [block_size, True]}))
            self._segment_blocks.append([block_size, 0])
            self.reserved += block_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        counts = self._segment_blocks[segment]
        if counts[1] == 0:
            self.in_use += counts[0]
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        counts[1] += 1
        _, offsets, blocks = self._segments[segment]
        rest = block_size - size
        if rest >= (512 if small else MiB + 1):   # a large block is split only when over 1 MiB would remain
            bisect.insort(offsets, offset + size)
            blocks[offset + size] = [rest, True]
            bisect.insort(free, (rest, segment, offset + size))
            block_size = size
        blocks[offset] = [block_size, False]
        self.allocated += block_size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return segment, offset

    def free(self, block: tuple[int, int]) -> None:
        """Give a block back to its segment, merged with free neighbours."""
        segment, offset = block
        small, offsets, blocks = self._segments[segment]
        free = self._free[small]
        size = blocks[offset][0]
        self.allocated -= size
        counts = self._segment_blocks[segment]
        counts[1] -= 1
        if counts[1] == 0:
            self.in_use -= counts[0]
        i = bisect.bisect_left(offsets, offset)
        if i + 1 < len(offsets) and blocks[offsets[i + 1]][1]:
            after = offsets.pop(i + 1)
            _remove(free, (blocks[after][0], segment, after))
            size += blocks.pop(after)[0]
        if i > 0 and blocks[offsets[i - 1]][1]:
            before = offsets[i - 1]
            _remove(free, (blocks[before][0], segment, before))
            offsets.pop(i)
            del blocks[offset]
            offset, size = before, size + blocks[before][0]
        blocks[offset] = [size, True]
        bisect.insort(free, (size, segment, offset))


def _remove(ordered: list, key: tuple) -> None:
    ordered.pop(bisect.bisect_left(ordered, key))


# ---------------------------------------------------------------------------------------------------------
# Live storages of meta tensors
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Models on the meta device
# ---------------------------------------------------------------------------------------------------------

_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "norm_num_groups": 32, "in_channels": 3, "out_channels": 3, "act_fn": "silu"}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}
_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}

# The published configs (diffusers / transformers config.json) of the three families, as far as they set sizes.
FAMILIES = {
    "sd15": {
        "family": "sd",
        "unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
                 "attention_head_dim": 8, "sample_size": 64, "in_channels": 4, "out_channels": 4,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text": [(_CLIP_L, -1, False)],
        "scheduler": _SCHEDULER,
    },
    "sd21": {
        "family": "sd",
        "unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024,
                 "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "upcast_attention": True,
                 "sample_size": 96, "in_channels": 4, "out_channels": 4,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {**_SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        "text": [({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                   "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512, "vocab_size": 49408,
                   "max_position_embeddings": 77}, -1, False)],
        "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "family": "sdxl",
        "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
                 "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                 "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "in_channels": 4,
                 "out_channels": 4, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                 "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]},
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text": [(_CLIP_L, -2, False),
                 ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408,
                   "max_position_embeddings": 77}, -2, True)],
        "scheduler": _SCHEDULER,
        "zero_uncond": True,
    },
}


def _folder_spec(folder: str) -> dict:
    """A local diffusers folder's configs in the form of :data:`FAMILIES` (its tokenizers are not read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig
    from .models import _model_index, _scheduler_config, model_family
    index = _model_index(folder)
    family = model_family(index)
    if family == "offline":
        raise ValueError("the offline model is a pixel-space demo model with its own encoder: estimate SD models "
                         "(sd15, sd21, sdxl or their folders)")
    text = [(AutoConfig.from_pretrained(folder, subfolder="text_encoder").to_dict(), -2 if family == "sdxl" else -1,
             False)]
    if family == "sdxl":
        text.append((AutoConfig.from_pretrained(folder, subfolder="text_encoder_2").to_dict(), -2, True))
    return {"family": family, "unet": dict(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            "vae": dict(AutoencoderKL.load_config(folder, subfolder="vae")), "text": text,
            "scheduler": _scheduler_config(folder, index),
            "zero_uncond": bool(index.get("force_zeros_for_empty_prompt", False))}


def model_from_configs(model: str, dtype: str | torch.dtype = "fp16", device: str = "meta"):
    """A :class:`~dedit_nb.models.DEditModel` of a family (``sd15``, ``sd21``, ``sdxl``) or a local diffusers
    folder, built from its configs on ``device`` (meta: no memory; elsewhere random weights) in ``dtype``
    (the VAE's dtype chosen as :func:`load_model` does). Its tokenizers are byte-level stand-ins: prompts
    are padded to fixed lengths, so shapes are the real ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from .models import DEditModel, EncoderSlot, TextConditioner, pick_dtype, vae_dtype
    from .testing import _tiny_clip_tokenizer
    spec = FAMILIES[model] if model in FAMILIES else _folder_spec(model)
    from diffusers.utils import logging as diffusers_logging
    dt = pick_dtype(torch.device("cuda"), dtype)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()   # its advice on casting with to() is for loaded weights
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec["unet"]).to(dt)
        vae = AutoencoderKL.from_config(spec["vae"])
        vae.to(vae_dtype(spec["family"], dict(vae.config), dt))
        slots = []
        for config, hidden_layer, pooled in spec["text"]:
            cls = CLIPTextModelWithProjection if pooled else CLIPTextModel
            config = CLIPTextConfig(**{k: v for k, v in config.items() if k in CLIPTextConfig().to_dict()})
            slots.append(EncoderSlot(_tiny_clip_tokenizer(), cls(config).to(dt), hidden_layer=hidden_layer,
                                     gives_pooled=pooled))
    diffusers_logging.set_verbosity(verbosity)
    text = TextConditioner(slots, added_time_ids=spec["family"] == "sdxl")
    return DEditModel(str(model), spec["family"], unet, spec["scheduler"], text, vae=vae,
                      device=torch.device(device), dtype=dt, zero_uncond=spec.get("zero_uncond", False))


def meta_like(model):
    """A loaded :class:`~dedit_nb.models.DEditModel`'s architecture on the meta device, in its dtypes (the
    tokenizers are copies: estimating adds item tokens to them)."""
    import copy
    import dataclasses
    from diffusers.utils import logging as diffusers_logging
    from .models import DEditModel, TextConditioner
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    with torch.device("meta"):
        unet = type(model.unet).from_config(model.unet.config).to(model.dtype)
        vae = None if model.vae is None else type(model.vae).from_config(model.vae.config).to(model._vae_dtype())
        slots = [dataclasses.replace(s, tokenizer=copy.deepcopy(s.tokenizer),
                                     encoder=type(s.encoder)._from_config(s.encoder.config).to(model.dtype))
                 for s in model.text.slots]
    diffusers_logging.set_verbosity(verbosity)
    return DEditModel(model.model_id, model.family, unet, model.scheduler_config,
                      TextConditioner(slots, added_time_ids=model.text.added_time_ids), vae=vae,
                      device=torch.device("meta"), dtype=model.dtype, zero_uncond=model.zero_uncond)


# ---------------------------------------------------------------------------------------------------------
# Attention and AdamW as CUDA runs them
# ---------------------------------------------------------------------------------------------------------

def attention_kernel(dtype: torch.dtype, capability: tuple[int, int] = T4) -> str:
    """The SDPA kernel CUDA picks for grouped and self-attention: 'efficient' (memory-efficient or flash: both
    keep only a log-sum-exp for the backward pass; the estimate runs memory-efficient attention, which also
    takes the masks of masked grouped attention) or 'math' (the attention matrix): bf16 needs compute
    capability 8.0 for both fused kernels."""
    return "math" if dtype == torch.bfloat16 and tuple(capability) < (8, 0) else "efficient"


@contextlib.contextmanager
def routed_attention(kernel: str):
    """``F.scaled_dot_product_attention`` runs the aten kernel CUDA would ('efficient', 'math'), or the one a
    CPU runs ('cpu': flash attention for CPU), whatever the tensors' device (on the meta device torch would
    always take the math path). The function is replaced, not intercepted by a mode, so that checkpointed
    blocks recomputed inside the backward pass route the same way."""
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or enable_gqa:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if kernel == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, is_causal=is_causal,
                                                                    attn_mask=attn_mask, scale=scale)[0]
        if attn_mask is not None and attn_mask.dtype == torch.bool:   # CUDA makes a bool mask an additive bias
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask.to(query.device), float("-inf"))
        if kernel == "math":
            return aten._scaled_dot_product_attention_math(query, key, value, attn_mask, is_causal=is_causal,
                                                           scale=scale)[0]
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, is_causal=is_causal,
                                                            scale=scale)[0]

    functional.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def _cuda_optimizers():
    """torch.optim's CUDA defaults (``foreach`` AdamW) for parameters on the meta device."""
    from torch.optim import optimizer
    cuda_devices = optimizer._get_foreach_kernels_supported_devices
    optimizer._get_foreach_kernels_supported_devices = lambda: [*cuda_devices(), "meta"]
    try:
        yield
    finally:
        optimizer._get_foreach_kernels_supported_devices = cuda_devices


# ---------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------

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
    from .session import Session
    labels = (np.arange(width)[None, :] * items // width).repeat(height, 0)
    image = np.zeros((height, width, 3), np.uint8)
    return Session.create(folder, image, resolution=min(width, height), multiple=8, labels=labels,
                          item_labels=[f"thing{k}" for k in range(items)], save=False)


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


def run_workload(model, work: Workload, on_phase) -> None:
    """Run the project's finetune and edit code on ``model`` (any device), calling ``on_phase(name)`` at the
    end of ``stage 1``, ``stage 2`` (the finetune's checkpoint saves, replaced: nothing is written) and
    ``edit``, and with :data:`EDIT_BEGINS` when the edit's phase starts."""
    import importlib
    import tempfile
    from unittest import mock
    F = importlib.import_module(f"{__package__}.finetune")   # the module (the package exports the function)
    from .conditioning import encode_items, latent_labels
    from .masks import edit_regions
    from .sampler import SamplingConfig, masked_sample

    ends = iter(PHASES[1:] if work.finetune else PHASES[-1:])
    config = F.FinetuneConfig(stage1_steps=2, stage2_steps=2, checkpoint_every=1000, lora=work.lora,
                              batch_size=work.batch_size, gradient_checkpointing=work.gradient_checkpointing,
                              offload_text_and_vae=work.offload_text_and_vae)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(F, "save_joint_weights",
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


def estimate(model="sd15", resolution: int = 512, dtype: str | torch.dtype = "fp16", lora: bool = False,
             gradient_checkpointing: bool = False, batch_size: int = 1, items: int = 6, guidance: float = 5.0,
             num_images: int = 1, capability: tuple[int, int] = T4, vae_tiling: bool = False,
             work: Workload | None = None) -> Estimate:
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


def _weights(model):
    return (t for m in model.modules() for t in [*m.parameters(), *m.buffers()])


# ---------------------------------------------------------------------------------------------------------
# Fitting a run into the device's memory
# ---------------------------------------------------------------------------------------------------------

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


def fit_finetune(model, sessions, config=None, auto_memory: bool = True, resume: bool = True,
                 capability: tuple[int, int] | None = None):
    """Predict a finetune's peak memory on ``model``'s CUDA device (:func:`estimate` of its largest image) and
    make it fit: returns ``(config, line)``, the config to train with and one line saying what was predicted
    and chosen. When it does not fit the device's free memory, ``auto_memory=True`` turns on gradient
    checkpointing, then LoRA, then halves the batch, then keeps the text encoders and VAE on the CPU between
    uses, until it fits (a finetune to resume keeps the settings that change its result: LoRA and the batch),
    and turns on VAE tiling for the edits when they would not fit;
    ``auto_memory=False`` raises :class:`MemoryFitError` naming those options. Other devices are not checked
    (the line says so; ``python -m dedit_nb.memory`` predicts a GPU's peak from anywhere)."""
    from .finetune import FinetuneConfig
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


def fit_edit(model, session, guidance: float = 5.0, num_images: int = 1, auto_memory: bool = True,
             capability: tuple[int, int] | None = None) -> str:
    """The same before edits: predict an edit's peak on ``model``'s CUDA device and, when it does not fit, turn
    on VAE tiling (``auto_memory=True``; slicing is always on) or raise :class:`MemoryFitError` naming it.
    Returns one line saying what was predicted and chosen."""
    from .finetune import FinetuneConfig
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


# ---------------------------------------------------------------------------------------------------------
# Checks against a real allocator
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


def measure_cpu(model, work: Workload) -> dict[str, int]:
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


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dedit_nb.memory", description=estimate.__doc__.split(".")[0])
    parser.add_argument("--model", default="sd15", help="sd15, sd21, sdxl or a local diffusers folder")
    parser.add_argument("--resolution", type=int, default=512, help="side of the square working image, pixels")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--mode", default="attention", choices=["attention", "lora"],
                        help="stage 2 trains the cross-attention q/k/v (attention) or a LoRA")
    parser.add_argument("--lora", action="store_true", help="same as --mode lora")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--capability", default="7.5", help="the GPU's compute capability (T4 7.5, L4 8.9, A100 8.0)")
    a = parser.parse_args(argv)
    capability = tuple(int(x) for x in a.capability.split("."))
    print(estimate(a.model, a.resolution, a.dtype, lora=a.lora or a.mode == "lora",
                   gradient_checkpointing=a.gradient_checkpointing, batch_size=a.batch_size, items=a.items,
                   guidance=a.guidance, capability=capability, vae_tiling=a.vae_tiling).table())


if __name__ == "__main__":
    main()
