"""Is an image something the chosen model can learn? The offline model knows only its synthetic scenes
(flat-coloured shapes on a plain or gently graded background, 32x32); on a photo it trains, reconstructs
noise and "edits" into noise. These checks say so before training, naming the parameter to change, and
flag a finetune whose reconstruction stays far from the image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .images import resize_rgb
from .profiles import PROFILES, SD1

if TYPE_CHECKING:
    from .models import DEditModel
    from .session import Session

RECOMMENDED_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
OFFLINE_SIZE = PROFILES["offline"].resolution
# Share of pixels a synthetic scene explains by colour: renders score 0.9-1.0 (edges of shapes scaled from
# another size are the rest); the bundled photos 0.01 and 0.27. Grey photos can pass on colour alone, so
# flat pixels count too: renders have 0.6-1.0 of them (the rest are shape edges), photos mostly under 0.25.
MIN_SCENE_LIKENESS = 0.75
MIN_FLAT_SHARE = 0.5
# Reconstruction PSNR under which a finetune did not learn the image (the offline model reaches about 25-33
# dB on its scenes; noise on a photo is about 10 dB).
MIN_RECON_PSNR = 18.0


def _scene_colours():
    from .offline.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS
    return (np.array(list(OBJECT_COLOURS.values()), np.float64),
            np.array(list(BACKGROUND_COLOURS.values()), np.float64))


def _at_offline_size(image: np.ndarray) -> np.ndarray:
    rgb = np.asarray(image)[..., :3]
    if rgb.shape[:2] != (OFFLINE_SIZE, OFFLINE_SIZE):
        rgb = resize_rgb(rgb, (OFFLINE_SIZE, OFFLINE_SIZE))
    return rgb


def flat_share(image: np.ndarray, tolerance: float = 6.0) -> float:
    """Share of pixels (at 32x32) that differ from none of their 4 neighbours by more than ``tolerance``."""
    a = _at_offline_size(image).astype(np.float64)
    rough = np.zeros(a.shape[:2], bool)
    dv = np.abs(a[1:] - a[:-1]).max(-1) > tolerance
    dh = np.abs(a[:, 1:] - a[:, :-1]).max(-1) > tolerance
    rough[1:] |= dv
    rough[:-1] |= dv
    rough[:, 1:] |= dh
    rough[:, :-1] |= dh
    return float(1 - rough.mean())


def scene_likeness(image: np.ndarray, tolerance: float = 12.0) -> float:
    """Share of pixels that a synthetic scene could have drawn: an object colour, or a background colour
    scaled by a gradient (0.75-1.25 of its brightness), each within ``tolerance`` (0-255 units), judged at
    the offline model's 32x32."""
    rgb = _at_offline_size(image)
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    objects, backgrounds = _scene_colours()
    near_object = (np.linalg.norm(pixels[:, None] - objects[None], axis=-1) <= tolerance).any(axis=1)
    # the nearest point of the segment base * [0.75, 1.25] to each pixel
    scale = (pixels @ backgrounds.T) / (backgrounds ** 2).sum(axis=1)
    scale = np.clip(scale, 0.75, 1.25)
    near_background = (np.linalg.norm(pixels[:, None] - scale[..., None] * backgrounds[None], axis=-1)
                       <= tolerance).any(axis=1)
    return float((near_object | near_background).mean())


def _is_offline(model: str | DEditModel) -> bool:
    model_id = model if isinstance(model, str) else getattr(model, "model_id", "")
    family = getattr(model, "family", None)
    return family == "offline" or model_id == "offline"


def domain_notes(session: Session, model: str | DEditModel = "offline", notebook: str = "02_finetune") -> list[str]:
    """One line for every image of ``session`` the model was not made for, naming the parameter to change;
    empty when all is well. ``model`` is a model id (as the notebooks' ``model`` parameter) or a loaded
    model; only the offline model has a known domain."""
    if not _is_offline(model):
        return []
    notes = []
    for entry in session.images:
        likeness = scene_likeness(entry.working)
        if likeness < MIN_SCENE_LIKENESS or flat_share(entry.working) < MIN_FLAT_SHARE:
            where = (" in 01_segment (the working size follows the model), 02_finetune and 03_edit"
                     if notebook == "01_segment" else "")
            size = (f"; segment it again in 01_segment with that model (SD 1.x works at {SD1.resolution} px, not "
                    f"{min(entry.working.shape[:2])})" if max(entry.working.shape[:2]) < 256 and where == "" else "")
            notes.append(
                f"image {entry.name!r} does not look like the offline model's synthetic scenes of flat shapes "
                f"({likeness:.0%} of its pixels have their colours): the offline model will learn noise. "
                f"Set model=\"{RECOMMENDED_MODEL}\" (or another Stable Diffusion id or folder){where}{size}.")
        elif max(entry.working.shape[:2]) > 4 * OFFLINE_SIZE:
            notes.append(
                f"image {entry.name!r} works at {entry.working.shape[1]}x{entry.working.shape[0]}; the offline "
                f"model was trained at {OFFLINE_SIZE}x{OFFLINE_SIZE}: segment it in 01_segment with "
                f"model=\"offline\" (its profile works at {OFFLINE_SIZE} px), or use "
                f"model=\"{RECOMMENDED_MODEL}\".")
    return notes


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    err = np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0 ** 2 / err))


def reconstruction_note(original: np.ndarray, reconstructed: np.ndarray,
                        model: str | DEditModel | None = None) -> str | None:
    """A warning when a reconstruction is far from the image it should reproduce, else None."""
    value = psnr(original, reconstructed)
    if value >= MIN_RECON_PSNR:
        return None
    hint = (f" The offline model only knows its synthetic scenes: set model=\"{RECOMMENDED_MODEL}\"."
            if model is not None and _is_offline(model) else
            " Train longer (stage1_steps, stage2_steps) or check that the model suits the image.")
    return (f"the reconstruction is far from the image (PSNR {value:.1f} dB, below {MIN_RECON_PSNR:.0f} dB): "
            f"the finetune did not learn this image, so edits will not look like it.{hint}")
