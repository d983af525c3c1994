"""The partition type every segmenter returns, the rule that turns overlapping scored masks into one,
and the overlay picture."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import masks as M
from ..display import ITEM_COLOURS, item_colour, item_colour_name, item_overlay

PALETTE = ITEM_COLOURS


@dataclass
class Partition:
    """Items of one image: a label map (every pixel in exactly one item) and a name per item."""

    labels: np.ndarray
    item_names: list[str]

    def __post_init__(self):
        self.labels = M.check_labels(self.labels, len(self.item_names))

    @property
    def num_items(self) -> int:
        return len(self.item_names)

    def areas(self) -> np.ndarray:
        return M.item_areas(self.labels, self.num_items)


def compact(labels: np.ndarray, names: Sequence[str]) -> Partition:
    """Drop empty items and renumber; names follow their items."""
    new, used = M.compact_labels(labels)
    return Partition(new, [names[int(k)] for k in used])


def partition_from_masks(masks: Sequence[np.ndarray], scores: Sequence[float], names: Sequence[str] | None = None,
                         min_area_fraction: float = 0.002, background_min_fraction: float = 0.05,
                         background_name: str = "background") -> Partition:
    """Turn possibly overlapping, possibly incomplete masks into a partition. The rule:

    1. overlaps: a pixel goes to the covering mask with the highest score; equal scores go to the smaller
       mask (a small object on a larger one stays visible);
    2. uncovered pixels: if together they cover at least ``background_min_fraction`` of the image they
       become one ``background`` item, otherwise each joins its nearest item;
    3. fragments: connected pieces smaller than ``min_area_fraction`` of the image join their nearest
       neighbouring item (an item made only of small pieces disappears);
    4. items left without pixels are dropped. With no mask at all, one item covers the image.
    """
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if not masks:
        raise ValueError("partition_from_masks needs the image shape: pass at least one mask")
    shape = masks[0].shape
    names = list(names) if names is not None else [f"item{k}" for k in range(len(masks))]
    total = shape[0] * shape[1]
    areas = np.array([m.sum() for m in masks], dtype=float)
    # lexicographic priority: score first, then smaller area
    priority = np.asarray(scores, dtype=float) * (total + 1.0) - areas / (total + 1.0) * 0.5
    labels = M.resolve_overlaps(np.stack(masks), priority)
    holes = labels == M.UNASSIGNED
    if holes.sum() >= background_min_fraction * total:
        labels[holes] = len(masks)
        names.append(background_name)
    elif holes.all():
        labels[:] = 0
    else:
        labels = M.fill_unassigned(labels)
    labels = M.drop_fragments(labels, max(1, int(min_area_fraction * total)), keep_small_items=False)
    return compact(labels, names)


def overlay(image: np.ndarray, labels: np.ndarray, opacity: float = 0.5, outline: bool = True) -> np.ndarray:
    """The image with items tinted in their palette colours (and item borders drawn)."""
    colours = PALETTE[labels % len(PALETTE)].astype(np.float64)
    out = image.astype(np.float64) * (1 - opacity) + colours * opacity
    if outline:
        edge = np.zeros(labels.shape, bool)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        out[edge] = 255
    return out.round().astype(np.uint8)


def overlay_figure(image: np.ndarray, partition: Partition, title: str | None = None):
    """Matplotlib figure: the image, its coloured items, and a legend of item names with areas."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image")
    axes[1].imshow(item_overlay(image, partition.labels, "solid"), interpolation="nearest")  # swatch colours
    axes[1].set_title(title or f"{partition.num_items} items")
    for ax in axes:
        ax.axis("off")
    total = partition.labels.size
    # a name such as "red, middle left" describes the photo, not the chip beside it: say the chip's colour too
    handles = [Patch(color=np.array(item_colour(k)) / 255,
                     label=f"{k}: {name} ({a / total:.0%}), drawn {item_colour_name(k)}")
               for k, (name, a) in enumerate(zip(partition.item_names, partition.areas()))]
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
