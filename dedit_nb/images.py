"""Reading images of any kind into 8-bit RGB, and the working size a model can take."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 100_000_000  # larger inputs are refused rather than exhausting memory
MAX_ASPECT_RATIO = 16      # longer side / shorter side: a wider strip leaves no room for items at any resolution
MAX_WORKING_PIXELS = 4096 * 4096   # the working image: beyond this, sampling would exhaust any accelerator


class ImageInputError(ValueError):
    """An image that cannot be used, with the reason and the fix."""


def to_rgb_array(image) -> np.ndarray:
    """Any path, PIL image or array -> ``uint8 (H, W, 3)``.

    Grayscale is repeated to three channels, alpha is composited over white, 16-bit and float images are
    scaled to 8 bits. Refuses empty images and ones over 100 megapixels.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageInputError(f"image file {path} does not exist")
        if not path.is_file():      # a FIFO or a device would block the read; a folder is no image
            raise ImageInputError(f"{path} is not a regular file (a folder, FIFO or device); give an image file")
        try:
            with Image.open(path) as im:
                image = ImageOps.exif_transpose(im)  # as viewers show it (a copy, upright)
        except Exception as exc:  # noqa: BLE001
            raise ImageInputError(f"cannot read {path} as an image: {exc}") from exc
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_PIXELS:
            raise ImageInputError(f"image is {image.width}x{image.height}; downscale it below 100 megapixels")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image).astype(np.float64)
            image = (arr / max(arr.max(), 1) * 255.0) if arr.max() > 255 else arr
        elif image.mode in ("RGBA", "LA", "P", "PA"):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        else:
            image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise ImageInputError(f"expected an image (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageInputError(f"image is {arr.shape[1]}x{arr.shape[0]}; downscale it below 100 megapixels")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        full = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else 1.0
        alpha = arr[..., 3:4].astype(np.float64) / full
        arr = arr[..., :3].astype(np.float64) * alpha + (1 - alpha) * full
    elif arr.shape[2] != 3:
        raise ImageInputError(f"image has {arr.shape[2]} channels; give grayscale, RGB or RGBA")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if arr.max() <= 1.0 else 255.0 if arr.max() <= 255.0 else 65535.0
        return (np.clip(arr / top, 0, 1) * 255.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        top = 255.0 if arr.max() <= 255 else 65535.0
        return (arr.astype(np.float64) / top * 255.0).round().astype(np.uint8)
    raise ImageInputError(f"unsupported image dtype {arr.dtype}")


@dataclass(frozen=True)
class WorkingFit:
    """How an image becomes its working size: resized by one factor (aspect ratio kept), then the
    remainder past the last whole ``multiple`` centre-cropped away (less than one multiple per axis).
    Never stretched."""

    source: tuple[int, int]                 # (W, H) of the image as read
    resized: tuple[int, int]                # (W, H) after the uniform resize
    crop: tuple[int, int, int, int]         # (left, top, right, bottom) box kept of the resized image

    @property
    def size(self) -> tuple[int, int]:
        """The working size (W, H)."""
        left, top, right, bottom = self.crop
        return right - left, bottom - top

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 (H, W, 3)`` at the source size -> the working image."""
        left, top, right, bottom = self.crop
        return np.ascontiguousarray(resize_rgb(rgb, self.resized)[top:bottom, left:right])

    def apply_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map at the source size -> the working size (nearest, then the same crop)."""
        from .masks import resize_labels
        left, top, right, bottom = self.crop
        return resize_labels(labels, self.resized[::-1])[top:bottom, left:right]

    def as_dict(self) -> dict:
        """What the session and edit manifests record."""
        return {"source": list(self.source), "resized": list(self.resized), "crop": list(self.crop),
                "method": "resize keeping the aspect ratio, centre crop to a multiple"}


def fit_working_size(width: int, height: int, resolution: int, multiple: int) -> WorkingFit:
    """The working geometry of a ``width x height`` image: short side ``resolution`` (as diffusers' training
    scripts and SD users mean it), aspect ratio kept, sides cropped down to multiples of ``multiple`` (the
    model's latent factor, 8 for SD and SDXL)."""
    if resolution < multiple:
        raise ImageInputError(f"resolution {resolution} is below the model's size multiple {multiple}")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageInputError(f"the image is {width}x{height}, an aspect ratio of {ratio:.0f}:1, beyond the limit of "
                              f"{MAX_ASPECT_RATIO}:1; crop it to the part to edit")
    scale = resolution / min(width, height)
    rw, rh = max(multiple, round(width * scale)), max(multiple, round(height * scale))
    if rw * rh > MAX_WORKING_PIXELS:
        raise ImageInputError(f"at resolution {resolution} the image would be worked on at {rw}x{rh}, beyond the limit "
                              f"of {MAX_WORKING_PIXELS // 1_000_000} megapixels ({MAX_WORKING_PIXELS} pixels); lower "
                              "the resolution")
    w, h = rw // multiple * multiple, rh // multiple * multiple
    left, top = (rw - w) // 2, (rh - h) // 2
    return WorkingFit((width, height), (rw, rh), (left, top, left + w, top + h))


def working_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(W, H) of :func:`fit_working_size`."""
    return fit_working_size(width, height, resolution, multiple).size


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8 (H, W, 3)`` to ``size=(W, H)`` with a Lanczos filter."""
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr.copy()
    return np.asarray(Image.fromarray(arr).resize(size, Image.LANCZOS))


def rgb_to_tensor(arr: np.ndarray):
    """``uint8 (H, W, 3)`` -> float tensor ``(1, 3, H, W)`` in [-1, 1]."""
    import torch
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def tensor_to_rgb(images) -> np.ndarray:
    """Float tensor ``(B, 3, H, W)`` in [-1, 1] -> ``uint8 (B, H, W, 3)``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.numpy().astype(np.uint8).transpose(0, 2, 3, 1)
