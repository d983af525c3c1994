"""How the workbench shows things, defined once: item colours, the hard/soft/active region scheme, the
interactive edit defaults, and numbers and text made readable. No UI imports: the widgets, the notebooks'
figures and the gallery all take their colours and defaults from here, so a legend always matches.
"""
from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

import numpy as np

# A categorical palette of distinct colours (Sasha Trubetskoy's 20, the pastels last). Items are drawn in
# these colours exactly, never blended with the image, so a swatch is the colour seen on the canvas.
ITEM_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
    (128, 128, 0), (0, 0, 128), (250, 190, 212), (220, 190, 255), (170, 255, 195), (255, 215, 180),
    (255, 250, 200), (128, 128, 128)], dtype=np.uint8)
ITEM_COLOUR_NAMES = ("red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime", "teal",
                     "brown", "maroon", "olive", "navy", "pink", "lavender", "mint", "apricot", "beige", "grey")

OVERLAY_MODES = ("outline", "solid")

REGION_NAMES = ("hard", "soft", "active")
# hard is a mid grey: readable against JupyterLab's light and dark themes alike (a dark grey vanished on dark)
REGION_COLOURS = np.array([(128, 128, 128), (245, 166, 35), (30, 170, 230)], np.uint8)
REGION_MEANINGS = {
    "hard": "the original pixels, kept exactly",
    "soft": "a band blended with the original (held to it for the first `strength` share of steps)",
    "active": "generated",
}

def item_colour(k: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in ITEM_COLOURS[k % len(ITEM_COLOURS)])


def item_colour_name(k: int) -> str:
    """The name of item ``k``'s canvas colour (a chip's own colour, not the photo's)."""
    return ITEM_COLOUR_NAMES[k % len(ITEM_COLOUR_NAMES)]


def item_hex(k: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*item_colour(k))


def text_colour_on(rgb: Sequence[int]) -> str:
    """Black or white, whichever reads better on a background colour (relative luminance)."""
    r, g, b = (c / 255 for c in rgb)
    return "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "#fff"


def item_borders(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels within ``width`` pixels of a border between items; each keeps its own item, so an outline
    shows both items' colours side by side."""
    from scipy import ndimage as ndi
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    diff_v = labels[:-1] != labels[1:]
    diff_h = labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= diff_v
    edge[1:] |= diff_v
    edge[:, :-1] |= diff_h
    edge[:, 1:] |= diff_h
    if width > 1 and edge.any():
        edge = ndi.binary_dilation(edge, iterations=int(width) - 1)
    return edge


def border_width(shape: tuple[int, int]) -> int:
    """Outline width in image pixels: 1 up to 256 px, then growing so it stays visible when scaled down."""
    return max(1, round(max(shape) / 256))


def item_overlay(image: np.ndarray, labels: np.ndarray, mode: str = "outline",
                 visible: Sequence[bool] | None = None) -> np.ndarray:
    """The image with its items drawn in their exact palette colours.

    ``outline``: the image, with each item's border pixels in the item's colour; ``solid``: every item's
    pixels in its colour. Items whose ``visible`` entry is False show the plain image.
    """
    if mode not in OVERLAY_MODES:
        raise ValueError(f"overlay mode {mode!r} is not one of {OVERLAY_MODES}")
    labels = np.asarray(labels)
    out = np.array(image[..., :3], dtype=np.uint8, copy=True)
    paint = np.ones(labels.shape, bool) if mode == "solid" else item_borders(labels, border_width(labels.shape))
    if visible is not None:
        shown = np.flatnonzero(np.asarray(visible, bool))
        paint &= np.isin(labels, shown)
    out[paint] = ITEM_COLOURS[labels[paint] % len(ITEM_COLOURS)]
    return out


def item_thumbnails(image: np.ndarray, labels: np.ndarray, num_items: int | None = None, size: int = 24,
                    fade: float = 0.75) -> list[np.ndarray]:
    """Each item as it looks in the photo: its bounding box cut from ``image``, the other items' pixels faded
    toward white by ``fade``, scaled (nearest neighbour, aspect kept) to fit ``size`` x ``size``. Items are
    named by their colour in the photo ("red, centre"), which the canvas colour of their swatch is not; the
    thumbnail sits beside the name so the two agree. Items with no pixels (up to ``num_items``, default: the
    highest label's) get a white square."""
    from PIL import Image
    from scipy import ndimage as ndi
    labels = np.asarray(labels)
    boxes = ndi.find_objects(labels + 1, max_label=num_items or int(labels.max()) + 1)
    thumbs = []
    for k, box in enumerate(boxes):
        if box is None:
            thumbs.append(np.full((size, size, 3), 255, np.uint8))
            continue
        h, w = labels[box].shape
        scale = size / max(h, w)
        shape = (max(1, round(w * scale)), max(1, round(h * scale)))
        # shrink first (nearest neighbour picks the same pixels of the image and of the item mask), then fade:
        # the fade touches size x size pixels, not the item's whole box
        crop = np.asarray(Image.fromarray(image[box]).resize(shape, Image.NEAREST)).astype(np.float32)
        other = np.asarray(Image.fromarray(labels[box] != k).resize(shape, Image.NEAREST))
        crop[other] = crop[other] * (1 - fade) + 255 * fade
        thumbs.append(crop.round().astype(np.uint8))
    return thumbs


def region_picture(regions) -> np.ndarray:
    """A ``masks.Regions`` as an RGB picture in the region colours (hard, soft, active)."""
    return REGION_COLOURS[regions.as_uint8()]


def region_legend_html() -> str:
    """The region colours as an inline HTML legend (the gallery's, matching ``region_picture``)."""
    chips = []
    for name, rgb in zip(REGION_NAMES, REGION_COLOURS):
        chips.append(f"<span title='{html.escape(REGION_MEANINGS[name])}' style='white-space:nowrap'>"
                     f"<span style='display:inline-block;width:11px;height:11px;vertical-align:middle;"
                     f"background:rgb({rgb[0]},{rgb[1]},{rgb[2]});border:1px solid #888'></span> {name}</span>")
    return "<span class='dedit-region-legend' style='font-size:11px'>" + " &nbsp;".join(chips) + "</span>"


def region_legend_handles():
    """Matplotlib legend handles for the region colours (the notebooks' figures)."""
    from matplotlib.patches import Patch
    return [Patch(facecolor=REGION_COLOURS[k] / 255, edgecolor="#888", label=f"{name} ({REGION_MEANINGS[name]})")
            for k, name in enumerate(REGION_NAMES)]


def tidy_number(value: float, digits: int = 6) -> float | int:
    """``5.000000000000001`` -> ``5.0``: floats rounded to ``digits`` significant digits for display."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def tidy_numbers(obj: Any, digits: int = 6) -> Any:
    """``tidy_number`` applied to every float inside nested dicts, lists and tuples."""
    if isinstance(obj, Mapping):
        return {k: tidy_numbers(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tidy_numbers(v, digits) for v in obj]
    return tidy_number(obj, digits)


def shorten(text: str, limit: int = 60) -> str:
    """Cut plain text to ``limit`` characters with an ellipsis (cut before any HTML escaping)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def edit_summary(kind: str, params: Mapping) -> str:
    """A one-line plain-text description of an edit's parameters, e.g. ``text · item: bag · prompt: a red bag``;
    a composed edit's operations one after the other (``composed: remove · item: bag + text · ...``)."""
    if params.get("operations"):
        return f"{kind}: " + " + ".join(edit_summary(op.get("kind", "?"), op) for op in params["operations"])
    parts = [kind]
    for key in ("item", "name", "prompt", "source_item", "source_image", "template"):
        if params.get(key) not in (None, ""):
            parts.append(f"{key.replace('_', ' ')}: {shorten(params[key], 40)}")
    for label, move in (params.get("moves") or {}).items():
        bits = [f"dx {tidy_number(float(move['dx']), 3):g}", f"dy {tidy_number(float(move['dy']), 3):g}"]
        if move.get("scale", 1.0) != 1.0:
            bits.append(f"×{tidy_number(float(move['scale']), 3):g}")
        parts.append(f"move {shorten(label, 30)}: {' '.join(bits)}")
    return " · ".join(parts)
