"""The mask editor's tools in image coordinates: brush, eraser, fill, polygon, lasso and move, from the mouse
(``mouse_down``/``mouse_move``/``mouse_up`` take image coordinates: pixel (floor(y), floor(x))) or from typed
coordinates. While the mouse is down only client-side preview shapes are drawn; the stroke is applied to the
label map as one operation on release and the view is sent once.
"""
from __future__ import annotations

import re

import numpy as np

from .state import disk_stroke

TOOLS = ("brush", "eraser", "fill", "polygon", "lasso", "move", "sam")
MASK_TOOLS = tuple(t for t in TOOLS if t != "move")   # segmentation: moving an item is 03's edit, not a mask tool
TOOL_TIPS = {
    "brush": "brush (b): paint pixels into the selected item",
    "eraser": "eraser (e): give the selected item's pixels back to the item they had when saved",
    "fill": "fill (f): the connected region of similar colour goes to the selected item",
    "polygon": "polygon (p): click corners, click the first corner or press Enter to fill",
    "lasso": "lasso (l): drag a freehand outline; its inside goes to the selected item",
    "move": "move (m): drag an item to move it; 'item scale' resizes it; apply moves to keep them",
    "sam": "SAM (s): click points (positive / negative) or drag a box; the mask goes to the selected item",
}
COORD_HINTS = {
    "brush": "x,y x,y …  (stroke through these points)",
    "eraser": "x,y x,y …  (erase along these points)",
    "fill": "x,y  (fill from this pixel)",
    "polygon": "x,y x,y x,y …  (corners)",
    "lasso": "x,y x,y x,y …  (outline points)",
    "move": "dx,dy  (shift of the selected item)",
    "sam": "x,y …  points, or x0,y0,x1,y1 in box mode",
}


def parse_points(text: str) -> list[tuple[float, float]]:
    """``"10,20 30,40"`` (commas, spaces or semicolons) -> [(10, 20), (30, 40)]."""
    try:
        numbers = [float(t) for t in re.split(r"[\s,;()\[\]]+", text.strip()) if t]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) % 2:
        raise ValueError(f"expected x,y pairs such as '10,20 30,40'; got {text!r}")
    if not np.isfinite(numbers).all():
        raise ValueError(f"coordinates must be finite numbers; got {text!r}")
    return list(zip(numbers[::2], numbers[1::2]))


class MaskTools:
    """The tools of :class:`widgets.mask_editor.MaskEditor` (which builds the controls they read); SAM
    prompts are :class:`widgets.sam_tool.SamTool`'s."""

    # --- tools in image coordinates (called for canvas events, and by tests and code directly) ------
    def mouse_down(self, x: float, y: float) -> None:
        tool = self.tool.value
        self._pressed = True
        if tool in ("brush", "eraser", "lasso"):
            self._points = [(x, y)]
            self._preview_dot(x, y)
        elif tool == "fill":
            self._guard(lambda: self.state.flood_fill(int(np.floor(x)), int(np.floor(y)), self.tolerance.value))
        elif tool == "polygon":
            near = max(3, self.size.value, 6 / self.view_scale)
            if len(self._polygon) >= 3 and np.hypot(*np.subtract((x, y), self._polygon[0])) <= near:
                self.close_polygon()
            else:
                self._polygon.append((x, y))
                self.canvas.line_width = 1                  # not the width a brush stroke left behind
                self.canvas.stroke_style = "white"
                self.canvas.fill_style = "white"
                if len(self._polygon) > 1:
                    self.canvas.stroke_line(*self.to_canvas(*self._polygon[-2]), *self.to_canvas(x, y))
                self.canvas.fill_circle(*self.to_canvas(x, y), 2)
        elif tool == "move":
            self.state.selected = self.state.item_at(x, y, moved=True)   # the item where it is shown
            self._drag_start = (x, y)
        elif tool == "sam":
            self._drag_start = (x, y)

    def mouse_move(self, x: float, y: float) -> None:
        if not self._pressed:
            return
        if self.tool.value in ("brush", "eraser", "lasso"):
            last = self._points[-1]
            self._points.append((x, y))
            self.canvas.stroke_style = "rgba(255,255,255,0.6)"
            self.canvas.line_width = 2 * self.size.value * self.view_scale if self.tool.value != "lasso" else 1
            self.canvas.line_cap = "round"
            self.canvas.stroke_line(*self.to_canvas(*last), *self.to_canvas(x, y))

    def mouse_up(self, x: float, y: float) -> None:
        if not self._pressed:
            return
        self._pressed = False
        tool = self.tool.value
        if tool in ("brush", "eraser"):
            if (x, y) != self._points[-1]:
                self._points.append((x, y))
            points, self._points = self._points, []
            if not self._guard(lambda: self.stroke(points, erase=tool == "eraser")):
                self.render()  # clear the preview
        elif tool == "lasso":
            points, self._points = self._points + [(x, y)], []
            if len(points) < 3 or not self._guard(lambda: self.state.polygon(points)):
                self.render()
        elif tool == "move" and self._drag_start is not None:
            start, self._drag_start = self._drag_start, None
            item = self.state.selected
            old = self.state.moves.get(item)
            dx = (old.dx if old else 0.0) + x - start[0]
            dy = (old.dy if old else 0.0) + y - start[1]
            self._guard(lambda: self.state.set_move(item, dx=round(dx), dy=round(dy)))
        elif tool == "sam" and self._drag_start is not None:
            self._guard(lambda: self._sam_event(self._drag_start, (x, y)))
            self._drag_start = None

    def stroke(self, points, erase: bool = False) -> int:
        """Paint (or erase) the brush stroke through image points; returns pixels changed."""
        mask = disk_stroke(self.state.labels.shape, points, self.size.value)
        return self.state.erase(mask) if erase else self.state.assign(mask)

    # --- tool helpers --------------------------------------------------------------------------------
    def apply_coordinates(self, text: str) -> int:
        """The current tool at typed image coordinates (the path without a mouse); returns pixels changed,
        or for ``move`` 1 when the move was recorded."""
        tool = self.tool.value
        if tool == "sam" and self.sam_mode.value == "box":
            numbers = [float(t) for t in re.split(r"[\s,;()\[\]]+", text.strip()) if t]
            if len(numbers) != 4:
                raise ValueError(f"a SAM box is x0,y0,x1,y1; got {text!r}")
            return self._sam_event(tuple(numbers[:2]), tuple(numbers[2:]))
        points = parse_points(text)
        if tool in ("brush", "eraser"):
            return self.stroke(points, erase=tool == "eraser")
        if tool == "fill":
            (x, y), = points[:1]
            return self.state.flood_fill(int(np.floor(x)), int(np.floor(y)), self.tolerance.value)
        if tool in ("polygon", "lasso"):
            return self.state.polygon(points)
        if tool == "move":
            if len(points) != 1:
                raise ValueError(f"a move is one dx,dy pair; got {text!r}")
            self.state.set_move(self.state.selected, dx=points[0][0], dy=points[0][1])
            return 1
        changed = 0
        for point in points:
            changed += self._sam_event(point, point)
        return changed

    def close_polygon(self) -> None:
        points, self._polygon = self._polygon, []
        if len(points) < 3 or not self._guard(lambda: self.state.polygon(points)):
            self.render()
