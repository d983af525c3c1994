"""Attention and AdamW as CUDA runs them, whatever the tensors' device."""
from __future__ import annotations

import contextlib

import torch

aten = torch.ops.aten
T4 = (7, 5)   # compute capability of Colab's smallest GPU: the assumption unless told otherwise


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
