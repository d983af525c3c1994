"""What varies over a stage: the loss weight of each timestep (Min-SNR-gamma) and the learning rate of each
step (warm-up, then constant or a cosine decay)."""
from __future__ import annotations

import math

import torch


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str
                   ) -> torch.Tensor:
    """Min-SNR-gamma loss weights of timesteps ``t`` (Hang et al. 2023): ``min(snr, gamma)`` over what the
    target's error costs at that SNR (``snr`` for an epsilon target, ``snr + 1`` for v, 1 for the sample), so
    the easy low-noise steps stop dominating the gradient. ``gamma`` 0: all ones (no weighting)."""
    if not gamma:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    alpha = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    snr = alpha / (1 - alpha)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The share of a stage's learning rate at ``step`` (0-based) of ``steps``: a linear warm-up over
    ``warmup`` steps, then constant or a cosine decay towards 0 at the stage's step limit."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return 1.0
