"""Masked DDIM sampling with grouped prompts and three regions (hard, soft, active).

At every step the original latents, noised to the step's level, are blended back over the *hard* region,
and also over the *soft* band for the first ``strength`` share of the steps; the *active* region is
generated freely. After decoding, hard-region pixels are copied from the original image, so they are
exactly the original's (the reference leaves the VAE round-trip error there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import conditioning as C
from . import masks as M
from .images import tensor_to_rgb


@dataclass
class SamplingConfig:
    """steps: DDIM steps; guidance: classifier-free guidance scale (<= 1 disables the unconditional pass);
    strength: share of steps during which the soft band is held to the original; edge_thickness: soft band
    width in pixels; seed: image j uses seed + j; num_images: samples per edit; eta: DDIM noise (0 = DDIM)."""

    steps: int = 50
    guidance: float = 5.0
    strength: float = 0.5
    edge_thickness: int = 10
    seed: int = 0
    num_images: int = 1
    eta: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength is a share of the steps, between 0 and 1; got {self.strength}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.edge_thickness < 0:
            raise ValueError(f"edge_thickness must be >= 0 pixels, got {self.edge_thickness}")


def latent_regions(model, regions: M.Regions) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard and soft maps at latent resolution. A latent cell is active if any of its pixels is active,
    soft if any is soft (and none active), and hard only when all its pixels are hard."""
    f = model.vae_scale
    active = M.downsample_any(regions.active, f)
    soft = M.downsample_any(regions.soft, f) & ~active
    hard = ~(active | soft)
    to_t = lambda a: torch.as_tensor(a, device=model.device)  # noqa: E731
    return to_t(hard), to_t(soft)


@torch.no_grad()
def masked_sample(model, cond: C.Conditioning, labels: torch.Tensor, original: np.ndarray,
                  regions: M.Regions, config: SamplingConfig, progress: bool = True) -> list[np.ndarray]:
    """Generate ``config.num_images`` images for one image's item prompts and label map.

    cond: the items' prompts (``conditioning.encode_items``); labels: latent-resolution item map ``(h, w)``;
    original: the working image ``uint8 (H, W, 3)``; regions: pixel-level hard/soft/active maps.
    Returns uint8 images whose hard-region pixels equal ``original``.
    """
    from .images import rgb_to_tensor

    n = config.num_images
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(config.steps, device=model.device)
    timesteps = scheduler.timesteps
    h, w = labels.shape
    shape = (1, model.latent_channels, h, w)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(config.seed + j)) for j in range(n)])
    noise = noise.to(device=model.device, dtype=model.dtype)
    latents = noise * scheduler.init_noise_sigma

    freeze = bool((~regions.active).any())
    if freeze:
        original_latents = model.encode_images(rgb_to_tensor(original)).expand(n, -1, -1, -1)
        hard, soft = latent_regions(model, regions)
        hard_or_soft = hard | soft

    guided = config.guidance > 1.0
    conds, maps = [cond] * n, [labels] * n
    if guided:
        conds += [C.unconditional(model)] * n
        maps += [torch.zeros_like(labels)] * n
    states, layout, pooled = C.batch(conds, maps)
    states = states.to(model.dtype)
    pooled = None if pooled is None else pooled.to(model.dtype)
    soft_steps = config.strength * len(timesteps)

    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = model.predict(model_in, t, states, layout, pooled)
        if guided:
            cond_pred, uncond_pred = pred.chunk(2)
            pred = uncond_pred + config.guidance * (cond_pred - uncond_pred)
        latents = scheduler.step(pred, t, latents, eta=config.eta).prev_sample
        if freeze:
            keep = hard_or_soft if i < soft_steps else hard
            if i + 1 < len(timesteps):
                reference = scheduler.add_noise(original_latents, noise, timesteps[i + 1:i + 2])
            else:
                reference = original_latents
            latents = torch.where(keep, reference.to(latents.dtype), latents)

    images = tensor_to_rgb(model.decode_latents(latents))
    if freeze:
        images = np.where(regions.hard[None, ..., None], original[None], images)
    return [img for img in images]
