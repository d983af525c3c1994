"""Segmentation without weights: SLIC superpixels, merged greedily by colour and adjacency.

Superpixels are merged pairwise, always the adjacent pair with the smallest Ward cost
``n_a n_b / (n_a + n_b) * |mean_a - mean_b|^2`` in CIELAB, until ``num_items`` regions remain. Ward's
cost merges small regions early, so the result has few slivers, and merging only adjacent regions keeps
each item connected. Deterministic for a given image.
"""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2lab
from skimage.segmentation import slic

from .. import masks as M
from .partition import Partition, compact

COLOUR_NAMES = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "red": (200, 30, 30),
    "orange": (240, 140, 30), "yellow": (230, 220, 50), "green": (50, 160, 60), "blue": (40, 80, 200),
    "purple": (130, 50, 160), "brown": (120, 70, 30), "pink": (240, 150, 180), "beige": (220, 200, 160),
}


def colour_name(rgb) -> str:
    names = list(COLOUR_NAMES)
    ref = rgb2lab(np.array([COLOUR_NAMES[n] for n in names], np.uint8)[None])[0]
    lab = rgb2lab(np.asarray(rgb, np.uint8).reshape(1, 1, 3))[0, 0]
    return names[int(np.argmin(((ref - lab) ** 2).sum(1)))]


def _adjacency(sp: np.ndarray, n: int) -> np.ndarray:
    adj = np.zeros((n, n), bool)
    for a, b in ((sp[:, :-1], sp[:, 1:]), (sp[:-1, :], sp[1:, :])):
        diff = a != b
        adj[a[diff], b[diff]] = True
    return adj | adj.T


def merge_regions(sp: np.ndarray, lab: np.ndarray, num_items: int) -> np.ndarray:
    """Greedy Ward merging of adjacent regions of a label map down to ``num_items`` regions."""
    n = int(sp.max()) + 1
    sizes = np.bincount(sp.ravel(), minlength=n).astype(float)
    sums = np.stack([np.bincount(sp.ravel(), weights=lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
    means = sums / np.maximum(sizes, 1)[:, None]
    adj = _adjacency(sp, n)
    alive = sizes > 0
    parent = np.arange(n)
    while alive.sum() > num_items:
        d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
        cost = sizes[:, None] * sizes[None, :] / np.maximum(sizes[:, None] + sizes[None, :], 1) * d2
        cost[~adj] = np.inf
        cost[~alive, :] = np.inf
        cost[:, ~alive] = np.inf
        np.fill_diagonal(cost, np.inf)
        a, b = np.unravel_index(np.argmin(cost), cost.shape)
        if not np.isfinite(cost[a, b]):
            break  # no adjacent pair left (disconnected regions)
        total = sizes[a] + sizes[b]
        means[a] = (means[a] * sizes[a] + means[b] * sizes[b]) / total
        sizes[a], sizes[b] = total, 0
        alive[b] = False
        adj[a] |= adj[b]
        adj[:, a] |= adj[:, b]
        adj[b] = adj[:, b] = False
        adj[a, a] = False
        parent[parent == b] = a
    return parent[sp]


def segment_offline(image: np.ndarray, num_items: int = 6, superpixels: int = 200, compactness: float = 10.0,
                    min_area_fraction: float = 0.01) -> Partition:
    """Partition an RGB image into about ``num_items`` items with no model weights.

    Items are named by their mean colour and position (e.g. ``"brown, top left"``).
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    image = np.asarray(image)
    lab = rgb2lab(image)
    sp = slic(image, n_segments=superpixels, compactness=compactness, start_label=0, enforce_connectivity=True,
              convert2lab=True)
    labels = merge_regions(sp, lab, num_items)
    labels = M.drop_fragments(labels.astype(np.int32), max(1, int(min_area_fraction * labels.size)))
    labels, _ = M.compact_labels(labels)
    names = []
    h, w = labels.shape
    for k in range(int(labels.max()) + 1):
        ys, xs = np.nonzero(labels == k)
        rows = "top" if ys.mean() < h / 3 else "bottom" if ys.mean() > 2 * h / 3 else "middle"
        cols = "left" if xs.mean() < w / 3 else "right" if xs.mean() > 2 * w / 3 else "centre"
        place = "centre" if (rows, cols) == ("middle", "centre") else f"{rows} {cols}"
        names.append(f"{colour_name(image[labels == k].mean(0))}, {place}")
    return compact(labels, _dedupe(names))


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} {seen[n]}")
    return out
