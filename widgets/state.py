"""The editable items of one image, shared by the mask editor and the item palette.

``ItemState`` holds a label map (always a partition), item names, templates and visibility, an undo/redo
history of every change, and the pending mask edit (items dragged or resized). It is a traitlets object:
``version`` increases on every change and ``selected`` names the current item, so widgets and notebook
code can observe both. All mask math is delegated to ``dedit_nb.masks``.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import traitlets
from scipy import ndimage as ndi

from dedit_nb import masks as M

MAX_UNDO = 50


class ItemsChangedError(ValueError):
    """The session's items are no longer the ones this state was loaded from (another editor saved)."""


class ItemState(traitlets.HasTraits):
    version = traitlets.Int(0)       # bumped on every change of labels, names, templates or visibility
    selected = traitlets.Int(0)      # the item that painting assigns pixels to (one selection for every view)
    stale = traitlets.Bool(False)    # the session's items were saved by someone else since they were loaded

    @traitlets.validate("selected")
    def _valid_selection(self, proposal):
        k = int(proposal["value"])
        if hasattr(self, "names") and not 0 <= k < len(self.names):
            raise traitlets.TraitError(f"no item {k}: items are 0..{len(self.names) - 1}")
        return k

    def __init__(self, image: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 templates: Sequence[str] | None = None):
        super().__init__()
        self.image = np.asarray(image)
        labels = M.check_labels(np.asarray(labels), len(names), shape=self.image.shape[:2])
        self.labels = labels.copy()
        self.names = list(names)
        self.templates = list(templates) if templates is not None else ["*"] * len(names)
        self.visible = [True] * len(names)
        self.saved = (self.labels.copy(), list(self.names), list(self.templates))
        self.moves: dict[int, M.ItemMove] = {}
        self._undo: list[tuple] = []
        self._redo: list[tuple] = []

    @classmethod
    def from_session(cls, session, image=0) -> "ItemState":
        entry = session.image(image)
        return cls(entry.working, entry.labels, [i.name for i in entry.items], [i.template for i in entry.items])

    # --- history -------------------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        return (self.labels.copy(), list(self.names), list(self.templates), list(self.visible), dict(self.moves))

    def _restore(self, snap: tuple) -> None:
        self.labels, self.names, self.templates, self.visible, self.moves = (
            snap[0].copy(), list(snap[1]), list(snap[2]), list(snap[3]), dict(snap[4]))
        self.selected = min(self.selected, self.num_items - 1)
        self.version += 1

    def _commit(self, before: tuple, selected: int | None = None) -> None:
        self._undo.append(before)
        del self._undo[:-MAX_UNDO]
        self._redo.clear()
        self.selected = min(self.selected if selected is None else selected, self.num_items - 1)
        self.version += 1

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def is_saved_base(self, session, image=0) -> bool:
        """True when the session's items of ``image`` are still the ones this state was loaded from or last
        saved (another editor on the session has not saved over them)."""
        entry = session.image(image)
        labels, names, templates = self.saved
        return ([i.name for i in entry.items] == names and [i.template for i in entry.items] == templates
                and np.array_equal(entry.labels, labels))

    def load(self, labels: np.ndarray, names: Sequence[str], templates: Sequence[str]) -> None:
        """Start again from these items (a session's current ones) as the saved base; undoable."""
        labels = M.check_labels(np.asarray(labels), len(names), shape=self.image.shape[:2])
        before = self._snapshot()
        self.labels, self.names, self.templates = labels.copy(), list(names), list(templates)
        self.visible, self.moves = [True] * len(names), {}
        self.saved = (self.labels.copy(), list(self.names), list(self.templates))
        self.stale = False
        self._commit(before)

    @property
    def dirty(self) -> bool:
        """True when the items differ from the last saved ones, or moves are pending."""
        labels, names, templates = self.saved
        return bool(self.moves) or names != self.names or templates != self.templates or not np.array_equal(
            labels, self.labels)

    def undo(self) -> bool:
        if not self._undo:
            return False
        self._redo.append(self._snapshot())
        self._restore(self._undo.pop())
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        self._undo.append(self._snapshot())
        self._restore(self._redo.pop())
        return True

    def reset(self) -> None:
        """Back to the last saved items (undoable)."""
        before = self._snapshot()
        labels, names, templates = self.saved
        self.labels, self.names, self.templates = labels.copy(), list(names), list(templates)
        self.visible = [True] * len(names)
        self.moves = {}
        self._commit(before)

    # --- painting ------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.names)

    def _check_item(self, item: int) -> int:
        if not 0 <= item < self.num_items:
            raise ValueError(f"no item {item}: items are 0..{self.num_items - 1}")
        return item

    def assign(self, mask: np.ndarray, item: int | None = None) -> int:
        """Give the pixels of ``mask`` to ``item`` (default: the selected item). Returns pixels changed."""
        item = self._check_item(self.selected if item is None else item)
        mask = np.asarray(mask, bool) & (self.labels != item)
        if not mask.any():
            return 0
        before = self._snapshot()
        self.labels[mask] = item
        self._commit(before)
        return int(mask.sum())

    def erase(self, mask: np.ndarray, item: int | None = None, to_item: int | None = None) -> int:
        """Take the pixels of ``mask`` away from ``item`` (default: selected). They go to ``to_item`` when
        given, else back to the item they had when last saved, else to the nearest other item."""
        item = self._check_item(self.selected if item is None else item)
        mask = np.asarray(mask, bool) & (self.labels == item)
        if not mask.any():
            return 0
        if mask.sum() == (self.labels == item).sum() and to_item is None and self.num_items == 1:
            raise ValueError("the only item cannot give its pixels away")
        before = self._snapshot()
        if to_item is not None:
            self.labels[mask] = self._check_item(to_item)
        else:
            saved = self.saved[0]
            back = mask & (saved != item) & (saved < self.num_items)
            self.labels[back] = saved[back]
            rest = mask & ~back
            if rest.any():
                holes = self.labels.copy()
                holes[rest] = M.UNASSIGNED
                self.labels = M.fill_unassigned(holes, donors=(holes != item) & (holes != M.UNASSIGNED))
        self._commit(before)
        return int(mask.sum())

    def flood_fill(self, x: int, y: int, tolerance: float = 20.0, item: int | None = None) -> int:
        """Assign the image region of similar colour connected to pixel (x, y)."""
        from skimage.segmentation import flood
        h, w = self.labels.shape
        if not (0 <= x < w and 0 <= y < h):
            return 0
        lab = self.image.astype(np.float64)
        dist = np.sqrt(((lab - lab[int(y), int(x)]) ** 2).sum(-1))
        region = flood(dist, (int(y), int(x)), tolerance=tolerance)
        return self.assign(region, item)

    def polygon(self, points: Sequence[tuple[float, float]], item: int | None = None) -> int:
        """Assign the inside of a polygon given as (x, y) vertices."""
        from skimage.draw import polygon as draw_polygon
        if len(points) < 3:
            raise ValueError("a polygon needs at least three points")
        xs, ys = zip(*points)
        rr, cc = draw_polygon(np.array(ys), np.array(xs), shape=self.labels.shape)
        mask = np.zeros(self.labels.shape, bool)
        mask[rr, cc] = True
        return self.assign(mask, item)

    # --- items ---------------------------------------------------------------------------------------
    def add_item(self, name: str | None = None, template: str = "*") -> int:
        before = self._snapshot()
        self.names.append(name or next(f"item{k}" for k in itertools.count(self.num_items)
                                       if f"item{k}" not in self.names))
        self.templates.append(template)
        self.visible.append(True)
        self._commit(before, selected=self.num_items - 1)
        return self.num_items - 1

    def rename(self, item: int, name: str) -> None:
        self._check_item(item)
        if self.names[item] != name:
            before = self._snapshot()
            self.names[item] = name
            self._commit(before)

    def set_template(self, item: int, template: str) -> None:
        self._check_item(item)
        if self.templates[item] != template:
            before = self._snapshot()
            self.templates[item] = template
            self._commit(before)

    def set_visible(self, item: int, visible: bool) -> None:
        self._check_item(item)
        if self.visible[item] != visible:
            self.visible[item] = visible
            self.version += 1

    def merge(self, items: Sequence[int]) -> int:
        """Merge items into the first; the others are deleted. Returns the kept item's new index."""
        items = list(dict.fromkeys(self._check_item(i) for i in items))  # each item once, first one kept
        if len(items) < 2:
            raise ValueError("select at least two items to merge")
        before = self._snapshot()
        self.labels = M.merge_items(self.labels, items)
        keep = items[0]
        for drop in sorted(items[1:], reverse=True):
            self._drop_index(drop)
            keep -= drop < keep
        self._commit(before, selected=keep)
        return keep

    def delete(self, item: int) -> None:
        """Remove an item: its pixels go to the nearest other items (the remove edit's mask step)."""
        self._check_item(item)
        if self.num_items == 1:
            raise ValueError("the only item cannot be deleted")
        before = self._snapshot()
        if (self.labels == item).any():
            self.labels, _ = M.remove_item(self.labels, item)
        self._drop_index(item)
        self._commit(before)

    def _drop_index(self, item: int) -> None:
        self.labels[self.labels > item] -= 1
        for seq in (self.names, self.templates, self.visible):
            del seq[item]
        self.moves = {k - (k > item): v for k, v in self.moves.items() if k != item}

    def split(self, item: int) -> int:
        """Split an item into its connected parts; returns how many items were added."""
        self._check_item(item)
        before = self._snapshot()
        labels, added = M.split_components(self.labels, item)
        if not added:
            return 0
        self.labels = labels
        for k in range(added):
            self.names.append(f"{self.names[item]} part {k + 2}")
            self.templates.append(self.templates[item])
            self.visible.append(True)
        self._commit(before)
        return added

    def item_at(self, x: float, y: float, moved: bool = False) -> int:
        """The item at canvas point (x, y), clamped to the image; ``moved``: as the pending moves show it."""
        labels = self.preview_moves()[0] if moved else self.labels
        h, w = labels.shape
        return int(labels[min(max(int(np.floor(y)), 0), h - 1), min(max(int(np.floor(x)), 0), w - 1)])

    def areas(self) -> np.ndarray:
        return M.item_areas(self.labels, self.num_items)

    # --- pending mask edit (move / resize) -----------------------------------------------------------
    def set_move(self, item: int, dx: float | None = None, dy: float | None = None, scale: float | None = None) -> None:
        """Record how an item should move in the mask edit (does not change the current labels).

        Refused with a ValueError (nothing changes) when the item has no pixels, the values are not finite,
        or the move would take the item entirely off the image."""
        self._check_item(item)
        old = self.moves.get(item, M.ItemMove())
        new = M.ItemMove(dx=old.dx if dx is None else float(dx), dy=old.dy if dy is None else float(dy),
                         scale=old.scale if scale is None else float(scale))
        if not all(np.isfinite([new.dx, new.dy, new.scale])) or new.scale <= 0:
            raise ValueError(f"a move needs finite dx, dy and a positive scale; got {new}")
        if new == old:
            return
        own = self.labels == item
        if not own.any():
            raise ValueError(f"item {item} ({self.names[item]!r}) has no pixels to move; paint it first")
        if not M.transform_mask(own, new.dx, new.dy, new.scale).any():
            raise ValueError(f"that would move {self.names[item]!r} off the image (dx={new.dx:g}, dy={new.dy:g}, "
                             f"scale={new.scale:g}); the move was not changed")
        before = self._snapshot()
        if new == M.ItemMove():
            self.moves.pop(item, None)
        else:
            self.moves[item] = new
        self._commit(before)

    def clear_moves(self) -> None:
        if self.moves:
            before = self._snapshot()
            self.moves = {}
            self._commit(before)

    def apply_moves(self) -> int:
        """Make the pending moves part of the items (undoable); returns how many items moved."""
        if not self.moves:
            return 0
        before = self._snapshot()
        moved = len(self.moves)
        self.labels = self.preview_moves()[0].copy()
        self.moves = {}
        self._commit(before)
        return moved

    def preview_moves(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels after the pending moves (with the refill of uncovered pixels) and the active region.
        A move whose item has since lost its pixels, or whose item was repainted so that the move would now
        take it off the image, is left out of the preview until it applies again."""
        moves = {}
        for k, move in self.moves.items():
            own = self.labels == k
            if own.any() and M.transform_mask(own, move.dx, move.dy, move.scale).any():
                moves[k] = move
        if not moves:
            return self.labels, np.zeros(self.labels.shape, bool)
        return M.move_items(self.labels, moves, list(moves))

    # --- saving --------------------------------------------------------------------------------------
    def check(self) -> None:
        empty = [self.names[k] for k, a in enumerate(self.areas()) if a == 0]
        if empty:
            raise M.PartitionError(f"items {empty} have no pixels; paint them or delete them before saving")

    def save_to_session(self, session, image=0, replace_newer: bool = False) -> None:
        """Write the items into the session (validated first; nothing is written on error). Pending moves
        are refused: apply them (``apply_moves``) or clear them first, so none is silently dropped. Items
        that someone else saved into the session since this state loaded them are not overwritten unless
        ``replace_newer`` (an :class:`ItemsChangedError` says so; a change by another process is refused by
        the session's own save)."""
        if not replace_newer and not self.is_saved_base(session, image):
            raise ItemsChangedError("the session's items were changed (by another editor) since this editor "
                                    "loaded them: press 'reload' to continue from them, or 'save over' to "
                                    "replace them with these")
        if self.moves:
            moved = ", ".join(repr(self.names[k]) for k in self.moves)
            raise ValueError(f"{len(self.moves)} pending move(s) ({moved}) are not part of the items yet: "
                             f"press 'apply moves' to keep them or 'clear moves' to drop them, then save")
        self.check()
        session.set_items(image, self.labels, self.names, self.templates)
        self.saved = (self.labels.copy(), list(self.names), list(self.templates))
        self.stale = False
        self.version += 1


def _clip_segment(p0: np.ndarray, p1: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """The part of segment p0-p1 inside the box lo..hi (Liang-Barsky), or None."""
    t0, t1 = 0.0, 1.0
    d = p1 - p0
    for axis in range(2):
        for p, q in ((-d[axis], p0[axis] - lo[axis]), (d[axis], hi[axis] - p0[axis])):
            if p == 0:
                if q < 0:
                    return None
                continue
            t = q / p
            if p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return None
    return p0 + t0 * d, p0 + t1 * d


def disk_stroke(shape: tuple[int, int], points: Sequence[tuple[float, float]], radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` pixels of the stroke through canvas points (x, y).

    A canvas point (x, y) lies in pixel (floor(y), floor(x)); the stroke is the polyline through those
    pixels, rasterised densely and widened by ``radius`` (Euclidean), as a round brush paints. Segments are
    clipped to the canvas plus the brush radius first, so points far off the canvas cost nothing extra.
    """
    h, w = shape
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all() or not np.isfinite(radius) or radius < 0:
        raise ValueError("a stroke needs finite points and a radius >= 0")
    pad = int(np.ceil(radius)) + 1
    seeds = np.zeros((h + 2 * pad, w + 2 * pad), bool)
    pts = np.floor(pts)
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
    lo, hi = np.array([-pad, -pad], np.float64), np.array([w - 1 + pad, h - 1 + pad], np.float64)
    for p0, p1 in zip(pts[:-1], pts[1:]):
        clipped = _clip_segment(p0, p1, lo, hi)
        if clipped is None:
            continue
        (x0, y0), (x1, y1) = clipped
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int) + pad
        ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int) + pad
        ok = (xs >= 0) & (xs < w + 2 * pad) & (ys >= 0) & (ys < h + 2 * pad)
        seeds[ys[ok], xs[ok]] = True
    if not seeds.any():
        return np.zeros(shape, bool)
    return (ndi.distance_transform_edt(~seeds) <= radius)[pad:pad + h, pad:pad + w]
