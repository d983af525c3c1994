"""Item partitions as pure functions on arrays.

An image's items are stored as one *label map*: an integer array ``(H, W)`` whose value at a pixel is the
index of the item that owns it. A label map is a partition by construction (every pixel belongs to exactly
one item); the functions here keep it so. Item indices are stable: an operation that empties an item (the
remove edit) leaves its index unused rather than renumbering the others, so prompts stay attached to the
right items. ``compact_labels`` renumbers when a caller wants that.

Everything here is NumPy/SciPy and has no state; the engine, the segmenters and the widgets all call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

UNASSIGNED = -1


class PartitionError(ValueError):
    """Masks that do not cover every pixel exactly once, or an item operation that would break that."""


# ---------------------------------------------------------------------------------------------------------
# Conversions and checks
# ---------------------------------------------------------------------------------------------------------

def labels_from_masks(masks: Sequence[np.ndarray] | np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Turn a stack of boolean item masks ``(K, H, W)`` into a label map, checking it is a partition.

    Raises :class:`PartitionError` naming how many pixels overlap or are uncovered, and how to fix it.
    """
    stack = np.asarray(masks)
    if stack.ndim != 3 or stack.shape[0] == 0:
        raise PartitionError(f"expected a stack of item masks (K, H, W) with K >= 1, got shape {stack.shape}")
    if shape is not None and tuple(stack.shape[1:]) != tuple(shape):
        raise PartitionError(
            f"item masks are {stack.shape[2]}x{stack.shape[1]} (WxH) but the image works at "
            f"{shape[1]}x{shape[0]}; resize the masks with masks.resize_labels or segment at the session's size")
    binary = stack.astype(bool)
    coverage = binary.sum(axis=0)
    overlap, uncovered = int((coverage > 1).sum()), int((coverage == 0).sum())
    if overlap or uncovered:
        raise PartitionError(
            f"item masks must cover every pixel exactly once: {overlap} pixels are in several items and "
            f"{uncovered} pixels in none; resolve overlaps (e.g. masks.resolve_overlaps) and give uncovered "
            f"pixels to an item (e.g. masks.fill_unassigned)")
    for k in range(binary.shape[0]):
        if not binary[k].any():
            raise PartitionError(f"item mask {k} is empty; drop it or draw its pixels")
    return np.argmax(binary, axis=0).astype(np.int32)


def masks_from_labels(labels: np.ndarray, num_items: int | None = None) -> np.ndarray:
    """Boolean stack ``(K, H, W)`` of the items of a label map."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_items is None else num_items
    return labels[None] == np.arange(k)[:, None, None]


def check_labels(labels: np.ndarray, num_items: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a label map against an item count (and a size); returns it as int32."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise PartitionError(f"a label map is a 2-D array (H, W); got shape {labels.shape}")
    if labels.size == 0:
        raise PartitionError(f"a label map needs at least one pixel; got shape {labels.shape}")
    if shape is not None and labels.shape != tuple(shape):
        raise PartitionError(
            f"label map is {labels.shape[1]}x{labels.shape[0]} (WxH), the image works at {shape[1]}x{shape[0]}; "
            f"resize it with masks.resize_labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"a label map holds integer item indices; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_items):
        raise PartitionError(
            f"label map has values outside 0..{num_items - 1} (min {labels.min()}, max {labels.max()}): "
            f"every pixel must belong to one of the {num_items} items")
    return labels.astype(np.int32, copy=False)


def item_areas(labels: np.ndarray, num_items: int) -> np.ndarray:
    """Pixel count of every item."""
    return np.bincount(np.asarray(labels).ravel(), minlength=num_items)[:num_items]


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape=(H, W)``, sampling at pixel centres."""
    labels = np.asarray(labels)
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(int), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(int), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]].astype(np.int32)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber items so the used indices are 0..K'-1; returns (new labels, old index of each new item)."""
    used, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32), used


# ---------------------------------------------------------------------------------------------------------
# Refill and item edits
# ---------------------------------------------------------------------------------------------------------

def fill_unassigned(labels: np.ndarray, donors: np.ndarray | None = None) -> np.ndarray:
    """Give every ``UNASSIGNED`` pixel to the nearest assigned pixel's item (Euclidean distance transform).

    ``donors`` optionally restricts which assigned pixels may give their item (a boolean map); when no
    donor exists, every assigned pixel may. Cost is linear in the number of pixels, unlike a dense distance
    matrix between uncovered and border pixels.
    """
    labels = np.asarray(labels, dtype=np.int32)
    holes = labels == UNASSIGNED
    if not holes.any():
        return labels.copy()
    source = ~holes if donors is None else (~holes & donors)
    if not source.any():
        source = ~holes
    if not source.any():
        raise PartitionError("no pixel is assigned to any item, so there is nothing to refill from")
    _, (iy, ix) = ndi.distance_transform_edt(~source, return_indices=True)
    out = labels.copy()
    out[holes] = labels[iy[holes], ix[holes]]
    return out


def resolve_overlaps(masks: np.ndarray, priority: Sequence[float] | None = None) -> np.ndarray:
    """Label map from possibly overlapping masks: a pixel goes to the covering mask of highest priority
    (default: the smallest mask, so small objects stay visible on top of large ones); uncovered pixels
    are ``UNASSIGNED``."""
    masks = np.asarray(masks, dtype=bool)
    if priority is None:
        priority = -masks.reshape(len(masks), -1).sum(axis=1).astype(float)
    order = np.argsort(np.asarray(priority, dtype=float), kind="stable")
    labels = np.full(masks.shape[1:], UNASSIGNED, dtype=np.int32)
    for k in order:  # lowest priority first, highest painted last
        labels[masks[k]] = k
    return labels


def _require_item(labels: np.ndarray, item: int, num_items: int | None = None) -> None:
    n = num_items if num_items is not None else int(labels.max()) + 1
    if not 0 <= item < n:
        raise PartitionError(f"unknown item {item}: this image has items 0..{n - 1}")
    if not (labels == item).any():
        raise PartitionError(f"item {item} has no pixels (it was removed or is empty); pick another item")


def remove_item(labels: np.ndarray, item: int) -> tuple[np.ndarray, np.ndarray]:
    """Delete an item: its pixels go to the nearest other items. Returns (new labels, freed pixels)."""
    return compose_items(labels, removed=[item])


def transform_mask(mask: np.ndarray, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Move a boolean mask by (dx, dy) pixels and scale it about its centroid (nearest sampling).

    Pixels pushed outside the image are cut off. Positive dx moves right, positive dy moves down.
    """
    mask = np.asarray(mask, dtype=bool)
    if scale <= 0:
        raise PartitionError(f"scale must be positive, got {scale}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise PartitionError("cannot move an empty mask")
    cy, cx = ys.mean(), xs.mean()
    h, w = mask.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    # inverse map: output pixel -> source pixel
    sy = (gy - cy - dy) / scale + cy
    sx = (gx - cx - dx) / scale + cx
    iy, ix = np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    out = np.zeros_like(mask)
    out[inside] = mask[iy[inside], ix[inside]]
    return out


@dataclass(frozen=True)
class ItemMove:
    """How one item moves in a mask edit: shift by (dx, dy) pixels, scale about its centroid, or take an
    explicitly drawn ``mask`` (which overrides dx/dy/scale)."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    mask: np.ndarray | None = None


def move_items(labels: np.ndarray, moves: Mapping[int, ItemMove], priority: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Apply a mask edit to several items at once (:func:`compose_items` with moves only).

    Moved items are stacked over the items that stay, and among themselves by ``priority`` (a list of the
    moved items, last on top; default: the order of ``moves``). Pixels that no item covers afterwards go to
    the nearest item that did not move (so a moved item does not grow back into its old place).
    Returns (new labels, active mask = moved items' new pixels plus the refilled pixels).
    """
    if not moves:
        raise PartitionError("a mask edit needs at least one item to move, resize or redraw")
    return compose_items(labels, moves, priority)


def moved_mask(labels: np.ndarray, item: int, move: ItemMove) -> np.ndarray:
    """Where ``item`` of ``labels`` lies after ``move`` (its drawn mask, or its pixels shifted and scaled)."""
    _require_item(labels, item)
    if move.mask is not None:
        mask = np.asarray(move.mask, dtype=bool)
        if mask.shape != labels.shape:
            raise PartitionError(f"edited mask for item {item} is {mask.shape}, the image is {labels.shape}")
    else:
        mask = transform_mask(labels == item, move.dx, move.dy, move.scale)
    if not mask.any():
        raise PartitionError(
            f"item {item} would leave the image entirely (dx={move.dx}, dy={move.dy}, scale={move.scale}); "
            f"use a smaller shift or remove the item instead")
    return mask


def compose_items(labels: np.ndarray, moves: Mapping[int, ItemMove] | None = None,
                  priority: Sequence[int] | None = None, removed: Sequence[int] = (),
                  added: Sequence[np.ndarray] = (), num_items: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Several item edits as one new label map: ``moves`` (shifts, resizes, redrawn masks), ``removed``
    items and ``added`` new items (boolean masks; they get the indices ``num_items``, ``num_items + 1``...).

    The moved and removed items leave their pixels; the moved items are drawn at their new places by
    ``priority`` (the moved items, last on top; default: the order of ``moves``), the added items on top of
    everything in their order, taking the pixels of the items beneath. Pixels no item covers then go to the
    nearest item that was neither moved nor added. Returns (new labels, active mask = the drawn pixels plus
    the refilled ones).
    """
    labels = np.asarray(labels, dtype=np.int32)
    moves = dict(moves or {})
    n = int(labels.max()) + 1 if num_items is None else num_items
    order = list(priority) if priority is not None else list(moves)
    if sorted(order) != sorted(moves):
        raise PartitionError(f"priority {order} must list exactly the moved items {sorted(moves)}")
    for item in removed:
        _require_item(labels, item)
        if item in moves:
            raise PartitionError(f"item {item} cannot be moved and removed in one edit; do one or the other")
    new_masks = {item: moved_mask(labels, item, move) for item, move in moves.items()}
    out = labels.copy()
    out[np.isin(labels, [*moves, *removed])] = UNASSIGNED
    for item in order:
        out[new_masks[item]] = item
    drawn = np.zeros(labels.shape, dtype=bool)
    for m in new_masks.values():
        drawn |= m
    for j, mask in enumerate(added):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape or not mask.any():
            raise PartitionError(f"a new item's mask must be {labels.shape} with at least one pixel; got "
                                 f"{mask.shape} with {int(mask.sum())} pixels")
        out[mask] = n + j
        drawn |= mask
    refill = out == UNASSIGNED
    if refill.all():
        raise PartitionError(f"item(s) {list(removed)} cover the whole image; there is no other item to take "
                             "their pixels")
    redrawn = [*moves, *range(n, n + len(added))]
    return fill_unassigned(out, donors=~np.isin(out, redrawn)), drawn | refill


def replace_item_mask(labels: np.ndarray, item: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The item takes exactly ``mask``; pixels it gives up go to the nearest other items."""
    return move_items(labels, {item: ItemMove(mask=mask)})


def merge_items(labels: np.ndarray, items: Iterable[int]) -> np.ndarray:
    """Merge several items into the first of them (the others become empty)."""
    items = list(items)
    if len(items) < 2:
        raise PartitionError("merging needs at least two items")
    out = np.asarray(labels, dtype=np.int32).copy()
    out[np.isin(out, items)] = items[0]
    return out


def split_components(labels: np.ndarray, item: int, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """Split an item into its connected components. The largest keeps the item's index, the others get
    new indices after the current maximum. Returns (labels, number of new items)."""
    out = np.asarray(labels, dtype=np.int32).copy()
    _require_item(out, item)
    comp, n = ndi.label(out == item, structure=ndi.generate_binary_structure(2, connectivity))
    if n <= 1:
        return out, 0
    sizes = np.bincount(comp.ravel())[1:]
    keep = int(np.argmax(sizes)) + 1
    nxt = int(out.max()) + 1
    added = 0
    for c in range(1, n + 1):
        if c != keep:
            out[comp == c] = nxt + added
            added += 1
    return out, added


def drop_fragments(labels: np.ndarray, min_area: int, connectivity: int = 1, keep_small_items: bool = True
                   ) -> np.ndarray:
    """Give every connected piece smaller than ``min_area`` pixels to its nearest neighbouring item.

    With ``keep_small_items`` an item whose pieces are all small keeps its largest piece; without it such an
    item disappears (its index stays unused). If that would leave no pixel assigned, the largest piece of
    the image is kept.
    """
    labels = np.asarray(labels, dtype=np.int32)
    out = labels.copy()
    structure = ndi.generate_binary_structure(2, connectivity)
    largest = (0, None, None)
    for item in np.unique(labels):
        comp, n = ndi.label(labels == item, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        small = sizes < min_area
        if small.all() and keep_small_items:
            small[np.argmax(sizes)] = False
        if sizes.max() > largest[0]:
            largest = (int(sizes.max()), comp, int(np.argmax(sizes)) + 1)
        for c in np.nonzero(small)[0] + 1:
            out[comp == c] = UNASSIGNED
    if (out == UNASSIGNED).all():
        _, comp, c = largest
        out[comp == c] = labels[comp == c]
    return fill_unassigned(out)


# ---------------------------------------------------------------------------------------------------------
# Sampling regions
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Regions:
    """The three sampling regions of an edit, as boolean maps that partition the image.

    hard: frozen, the original is blended back at every step and composited back in pixels;
    soft: a band of ``edge_thickness`` pixels around the active region, frozen for the first ``strength``
    share of steps; active: generated freely.
    """

    hard: np.ndarray
    soft: np.ndarray
    active: np.ndarray

    def as_uint8(self) -> np.ndarray:
        """One map: 0 hard, 1 soft, 2 active."""
        return (self.soft * 1 + self.active * 2).astype(np.uint8)


def edit_regions(active: np.ndarray, edge_thickness: int) -> Regions:
    """Hard/soft/active regions for an active mask and a soft band width in pixels."""
    active = np.asarray(active, dtype=bool)
    if active.all():
        soft = np.zeros_like(active)
    elif not active.any():
        soft = np.zeros_like(active)
    else:
        dist = ndi.distance_transform_edt(~active)
        soft = (dist > 0) & (dist <= edge_thickness)
    hard = ~(active | soft)
    return Regions(hard=hard, soft=soft, active=active)


def downsample_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """A cell of the coarse grid is set when any pixel of its ``factor x factor`` block is set."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"mask {w}x{h} is not a multiple of {factor}")
    return mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))


def downsample_labels_majority(labels: np.ndarray, factor: int, num_items: int) -> np.ndarray:
    """Each cell of the coarse grid takes the item that covers most of its block (ties: lowest index)."""
    labels = np.asarray(labels)
    h, w = labels.shape
    if h % factor or w % factor:
        raise ValueError(f"label map {w}x{h} is not a multiple of {factor}")
    blocks = labels.reshape(h // factor, factor, w // factor, factor).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(h // factor, w // factor, factor * factor)
    counts = (blocks[..., None] == np.arange(num_items)).sum(axis=2)
    return np.argmax(counts, axis=-1).astype(np.int32)
