"""Inputs of the stored DDIM reference (tests/data/ddim_reference.npz): one small masked edit per family.

The stored latents (the final ones, before decoding) and images were made once by ``masked_sample`` as it was
at commit 1472f08, before the sampler became a loop over a scheduler with callbacks, on these inputs (tiny
models from ``build_tiny_model(family, folder)``, one thread); they pin DDIM at eta 0 to that code path.
"""
from pathlib import Path

import numpy as np
import torch

from dedit_nb import conditioning as C
from dedit_nb import masks as M
from dedit_nb.sampler import SamplingConfig

REFERENCE = Path(__file__).parent / "data" / "ddim_reference.npz"
REFERENCE_FAMILIES = ("sd", "offline")
REFERENCE_CONFIG = dict(steps=4, guidance=3.0, strength=0.5, edge_thickness=3, seed=3, num_images=2, eta=0.0)


def gradient_image(h: int, w: int) -> np.ndarray:
    """A smooth, deterministic RGB image (no resampling library involved)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def reference_case(model, h: int = 32, w: int = 48):
    """Conditioning, latent item map, original, regions and config of the reference edit on ``model``."""
    labels = np.zeros((h, w), np.int32)
    labels[:, w // 2:] = 1
    labels[: h // 3, :] = 2
    cond = C.encode_items(model, ["a red cup", "a wooden table", "a white wall"], [C.ITEM_PROMPT_LENGTH] * 3,
                          M.item_areas(labels, 3).astype(float).tolist())
    regions = M.edit_regions(labels == 0, REFERENCE_CONFIG["edge_thickness"])
    return cond, C.latent_labels(model, labels, 3), gradient_image(h, w), regions, SamplingConfig(**REFERENCE_CONFIG)


def run_recording_latents(model, sample, *args, **kwargs):
    """Run ``sample(model, *args)`` and return its images with the latents it decoded."""
    seen = []
    decode = model.decode_latents

    def recording(latents):
        seen.append(latents.detach().float().cpu().numpy())
        return decode(latents)

    model.decode_latents = recording
    try:
        images = sample(model, *args, **kwargs)
    finally:
        model.decode_latents = decode
    return np.stack(images), seen[-1]

