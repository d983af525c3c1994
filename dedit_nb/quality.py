"""A record of how well an edit kept what it should keep, from the arrays the edit already has (no weights).

:func:`quality_record` takes the original image, one edited image and the edit's regions (for a composed
edit: the union of its operations' regions) and returns plain numbers for ``manifest.json``:

- ``preserved_pixels_changed``: pixels outside the active region and the soft band (the *preserved* pixels,
  ``regions.hard``) that differ from the original in any channel. D-Edit pastes them back, so it must be 0.
- ``mse_preserved``, ``psnr_preserved``, ``ssim_preserved``: over the preserved pixels only (images in
  [0, 1]; SSIM's local statistics use only preserved pixels, with the Gaussian window of skimage's
  ``gaussian_weights=True`` and torchmetrics: sigma 1.5, 11 x 11).
- ``mse_piebench``, ``psnr_piebench``, ``ssim_piebench``: as PIE-Bench's scoring script does it: both images
  multiplied by the preserved mask, then scored over the whole image (data range 1), so the numbers compare
  with published tables (which print MSE x 10^4 and SSIM x 10^2).
  A PSNR is null where the pixels are identical (infinite PSNR) or there are none; its MSE tells which.
- ``seam_score``: at the border between the preserved pixels and the regenerated ones (active + soft band,
  where the original is pasted back), the mean colour jump across the border divided by the mean colour
  step between neighbours near it (both in 0..255 levels, plus one level each): about 1 means no visible
  seam, large values a step the image did not have.
- ``soft_colour_shift_rgb`` (mean edited - original colour over the soft band, in levels) and its length
  ``soft_colour_shift``: a colour drift of the band that noise would average out.
- ``active_changed_share`` and ``active_mean_abs_diff``: the share of active pixels that changed, and their mean
  absolute change in levels.

Scores that need networks (:data:`WEIGHTED_SCORES`) are computed only by a :class:`WeightedScorer` built from
local weights the user passes (``metrics_weights={...}``; formats in :mod:`dedit_nb.perceptual`), under
``weight_scores``: ``lpips_piebench`` (LPIPS of both images multiplied by the preserved mask, as PIE-Bench scores
background preservation), ``clip_text_image`` and ``dino_structure_distance`` (whole images); otherwise the
record says in one line that they are unavailable.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage as ndi

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5                                   # window radius int(3.5 * 1.5 + 0.5) = 5: 11 x 11
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)   # border left out of SSIM's mean, as skimage does
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2               # K1, K2 for data range 1
SEAM_RING = 3                                         # pixels each side of the border whose steps are "inside"

WEIGHTED_SCORES = {"clip": "CLIP text-image score (100 x cosine, as torchmetrics' CLIPScore), a transformers "
                           "CLIPModel folder with its tokenizer",
                   "lpips": "LPIPS of the masked images (PIE-Bench's convention), a folder of config.json, "
                            "backbone.safetensors and linear.safetensors (dedit_nb.perceptual)",
                   "dino": "DINO structure distance of the whole images, a transformers ViTModel or Dinov2Model folder"}
UNAVAILABLE = ("weight-based scores (LPIPS, CLIP text-image, DINO structure) unavailable: pass "
               "metrics_weights={'lpips': FOLDER, 'clip': FOLDER, 'dino': FOLDER} with local weights to compute them")


def quality_record(original: np.ndarray, edited: np.ndarray, regions, text: str | None = None,
                   scorer: "WeightedScorer | None" = None) -> dict:
    """The quality figures of one edited image (see the module's notes). ``original`` and ``edited`` are
    uint8 ``(H, W, 3)``; ``regions`` has boolean ``active`` and ``soft`` maps ``(H, W)`` (e.g.
    :class:`masks.Regions`); ``text`` is what the edit asked for, used by weight-based text scores."""
    original, edited = np.asarray(original), np.asarray(edited)
    if original.shape != edited.shape or original.ndim != 3:
        raise ValueError(f"the original {original.shape} and the edited image {edited.shape} must be the same "
                         "(H, W, channels) shape")
    active, soft = np.asarray(regions.active, bool), np.asarray(regions.soft, bool)
    if active.shape != original.shape[:2] or soft.shape != active.shape:
        raise ValueError(f"regions {active.shape} must be at the image's resolution {original.shape[:2]}")
    preserved = ~(active | soft)
    diff = edited.astype(np.int16) - original
    changed = diff.any(axis=-1)
    record = {"preserved_pixels": int(preserved.sum()),
              "preserved_pixels_changed": int((changed & preserved).sum())}
    squared_error = float(np.square(diff[preserved], dtype=np.int32).sum()) / 255 ** 2   # data range 1
    record.update(preserved_scores(original, edited, preserved, squared_error))
    record.update(piebench_scores(original, edited, preserved, squared_error))
    shift = diff[soft].mean(axis=0) if soft.any() else None
    record.update({
        "seam_score": seam_score(edited, preserved),
        "soft_colour_shift_rgb": None if shift is None else [float(c) for c in shift],
        "soft_colour_shift": None if shift is None else float(np.linalg.norm(shift)),
        "active_changed_share": float(changed[active].mean()) if active.any() else None,
        "active_mean_abs_diff": float(np.abs(diff[active]).mean()) if active.any() else None,
        "weight_scores": scorer(original, edited, regions, text) if scorer is not None else UNAVAILABLE})
    return record


def psnr(mse: float | None) -> float | None:
    """PSNR in dB of an MSE for data range 1; None when infinite (MSE 0) or unknown."""
    return None if mse is None or mse == 0 else float(10 * math.log10(1 / mse))


def preserved_scores(original: np.ndarray, edited: np.ndarray, preserved: np.ndarray, squared_error: float) -> dict:
    """MSE, PSNR and SSIM of uint8 images over the ``preserved`` pixels only (data range 1), given the sum of
    their squared differences over the preserved pixels."""
    count = int(preserved.sum()) * original.shape[-1]
    mse = squared_error / count if count else None
    return {"mse_preserved": mse, "psnr_preserved": psnr(mse), "ssim_preserved": ssim(original, edited, preserved)}


def piebench_scores(original: np.ndarray, edited: np.ndarray, preserved: np.ndarray, squared_error: float) -> dict:
    """MSE, PSNR and SSIM of the uint8 images multiplied by the ``preserved`` mask, averaged over the whole
    image (PIE-Bench's convention for the unedited part; no score when nothing is preserved, as there), given
    the sum of their squared differences over the preserved pixels."""
    if not preserved.any():
        return {"mse_piebench": None, "psnr_piebench": None, "ssim_piebench": None}
    mse = squared_error / original.size
    keep = preserved[..., None]
    return {"mse_piebench": mse, "psnr_piebench": psnr(mse), "ssim_piebench": ssim(original * keep, edited * keep)}


def ssim(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float | None:
    """Mean SSIM of uint8 images ``(H, W, C)`` scaled to [0, 1], Gaussian window (sigma 1.5), population variances,
    leaving out a border of :data:`SSIM_RADIUS` pixels, as skimage's ``structural_similarity(...,
    gaussian_weights=True, use_sample_covariance=False, data_range=1)`` and torchmetrics compute it.
    With ``weight`` (a boolean ``(H, W)`` map), each window's statistics use only the weighted pixels and the
    mean runs over them: pixels outside do not count at all. None when no pixel is left to average."""
    r = SSIM_RADIUS
    inner = np.zeros(x.shape[:2], bool)
    inner[r:x.shape[0] - r, r:x.shape[1] - r] = True
    counted = inner if weight is None else inner & weight
    if not counted.any():
        return None
    if np.array_equal(x, y) if weight is None else np.array_equal(x[weight], y[weight]):
        return 1.0      # identical pixels (every preserved pixel of a D-Edit edit): exactly 1, without filtering
    x, y = x.astype(np.float64) / 255, y.astype(np.float64) / 255

    def local_mean(a):
        return ndi.gaussian_filter(a, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect")

    if weight is None:
        norm = 1.0
        mean = local_mean
    else:
        w = weight.astype(np.float64)[..., None]
        norm = np.maximum(local_mean(w), 1e-12)     # > 0 wherever a weighted pixel is counted

        def mean(a):
            return local_mean(a * w) / norm
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    s = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))
    return float(s[counted].mean())


# (first, second) pixels of vertical, then horizontal 4-neighbour pairs
NEIGHBOUR_PAIRS = (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                   ((slice(None), slice(None, -1)), (slice(None), slice(1, None))))


def seam_score(edited: np.ndarray, preserved: np.ndarray) -> float | None:
    """Mean colour jump between 4-neighbours on opposite sides of the preserved region's border, over the
    mean step between 4-neighbours on the same side within :data:`SEAM_RING` pixels of it (levels 0..255,
    plus one level each so flat images give finite numbers). None without such a border."""
    crossing = [preserved[a] != preserved[b] for a, b in NEIGHBOUR_PAIRS]
    border = np.zeros(preserved.shape, bool)
    for (a, b), cross in zip(NEIGHBOUR_PAIRS, crossing):
        border[a] |= cross
        border[b] |= cross
    if not border.any():
        return None
    rows, cols = np.flatnonzero(border.any(axis=1)), np.flatnonzero(border.any(axis=0))
    box = (slice(max(rows[0] - SEAM_RING, 0), rows[-1] + SEAM_RING + 1),
           slice(max(cols[0] - SEAM_RING, 0), cols[-1] + SEAM_RING + 1))   # all the ring: dilating less is faster
    img, preserved, border = edited[box].astype(np.float32), preserved[box], border[box]
    crossing = [preserved[a] != preserved[b] for a, b in NEIGHBOUR_PAIRS]
    ring = ndi.binary_dilation(border, iterations=SEAM_RING)
    across, near = [], []
    for (a, b), cross in zip(NEIGHBOUR_PAIRS, crossing):
        step = np.abs(img[a] - img[b]).mean(axis=-1)
        across.append(step[cross])
        near.append(step[~cross & ring[a] & ring[b]])
    across, near = np.concatenate(across), np.concatenate(near)
    return float((across.mean() + 1) / ((near.mean() if near.size else 0.0) + 1))


def quality_summary(record: Mapping | None) -> dict[str, str]:
    """The main figures of a record as short display strings, by column title (gallery cards, batch index);
    empty for an edit without a record."""
    if not isinstance(record, Mapping) or not record:     # none, or not a record (a manifest edited by hand)
        return {}

    def shown(value, spec: str) -> str:
        if value is None:
            return "–"
        return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    def number(key: str, spec: str) -> str:
        return shown(record.get(key), spec)

    def decibels(convention: str) -> str:
        if record.get(f"mse_{convention}") == 0:
            return "∞"                       # identical pixels
        return number(f"psnr_{convention}", ".2f")

    summary = {"preserved px changed": number("preserved_pixels_changed", "d"),
               "PSNR preserved (dB)": decibels("preserved"), "SSIM preserved": number("ssim_preserved", ".4f"),
               "PSNR PIE-Bench (dB)": decibels("piebench"), "seam": number("seam_score", ".2f"),
               "soft band shift": number("soft_colour_shift", ".1f"),
               "active changed": number("active_changed_share", ".0%")}
    scores = record.get("weight_scores")
    if isinstance(scores, Mapping):
        summary.update({str(name): shown(value, ".2f") for name, value in scores.items()})
    return summary


class WeightedScorer:
    """Scores that need network weights, loaded once from local folders: ``weights`` maps a name of
    :data:`WEIGHTED_SCORES` to a folder. Nothing is downloaded."""

    def __init__(self, weights: Mapping[str, str | Path]):
        unknown = sorted(set(weights) - set(WEIGHTED_SCORES))
        if unknown:
            raise ValueError(f"metrics_weights names {unknown}; the scores available are "
                             + "; ".join(f"{k!r}: {v}" for k, v in WEIGHTED_SCORES.items()))
        self.folders = {}
        for name, folder in weights.items():
            folder = Path(folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"metrics_weights[{name!r}] = {str(folder)!r} is not a folder; pass the local "
                                        f"folder of {WEIGHTED_SCORES[name]}")
            self.folders[name] = folder
        self._clip = None
        from . import perceptual       # torch and torchvision: only when weights are passed
        self.lpips = perceptual.LPIPS.from_folder(self.folders["lpips"]) if "lpips" in self.folders else None
        self.dino = perceptual.DinoStructure(self.folders["dino"]) if "dino" in self.folders else None

    def __call__(self, original: np.ndarray, edited: np.ndarray, regions, text: str | None) -> dict:
        scores = {}
        if self.lpips is not None:
            keep = ~(np.asarray(regions.active, bool) | np.asarray(regions.soft, bool))
            scores["lpips_piebench"] = self.lpips(original * keep[..., None], edited * keep[..., None]) \
                if keep.any() else None
        if "clip" in self.folders:
            scores["clip_text_image"] = self.clip_score(edited, text) if text else None
        if self.dino is not None:
            scores["dino_structure_distance"] = self.dino(original, edited)
        return scores

    def clip_score(self, image: np.ndarray, text: str) -> float:
        """100 x max(cosine, 0) between the CLIP embeddings of ``image`` and ``text`` (torchmetrics' CLIPScore,
        which PIE-Bench reports), with the image resized to the model's input size and normalised as CLIP's
        image processor does."""
        import torch
        from PIL import Image
        if self._clip is None:
            from transformers import AutoTokenizer, CLIPModel
            folder = self.folders["clip"]
            self._clip = (CLIPModel.from_pretrained(folder, local_files_only=True).eval(),
                          AutoTokenizer.from_pretrained(folder, local_files_only=True))
        model, tokenizer = self._clip
        size = model.config.vision_config.image_size
        pixels = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32) / 255
        mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
        pixels = torch.from_numpy((pixels - mean) / std).permute(2, 0, 1)[None]
        tokens = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**tokens, pixel_values=pixels)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return float(100 * max(cosine, 0.0))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)     # CLIP's image normalisation (its image processor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
