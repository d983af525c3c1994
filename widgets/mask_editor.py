"""An ipycanvas mask editor: paint, erase, fill, draw polygons, prompt SAM, and drag/resize items.

The canvas has the image's own pixel size and is scaled by CSS to ``display_width``; ipycanvas reports
mouse positions in canvas pixels, so a position maps to pixel (floor(y), floor(x)) at any aspect ratio.
While the mouse is down only client-side preview shapes are drawn; the stroke is applied to the label
map as one operation on release and the overlay is sent once, so a 1024x1024 image stays responsive.
"""
from __future__ import annotations

import numpy as np
import ipywidgets as W
from ipycanvas import Canvas, hold_canvas

from dedit_nb.segment.partition import item_colour, overlay

from .state import ItemState, disk_stroke

TOOLS = ("brush", "eraser", "fill", "polygon", "lasso", "move", "sam")
KEYS = {"b": "brush", "e": "eraser", "f": "fill", "p": "polygon", "l": "lasso", "m": "move", "s": "sam"}


class MaskEditor(W.VBox):
    """Edit an :class:`ItemState` on a canvas. Every change goes through the state (undoable, observable)."""

    def __init__(self, state: ItemState, display_width: int = 640, prompter=None, **kwargs):
        self.state = state
        self.prompter = prompter            # a dedit_nb.segment.sam.SamPrompter for click/box prompts
        h, w = state.labels.shape
        width = display_width
        self.canvas = Canvas(width=w, height=h, layout=W.Layout(width=f"{width}px", height=f"{round(width * h / w)}px"))
        self.tool = W.ToggleButtons(options=[t for t in TOOLS if t != "sam" or prompter is not None],
                                    value="brush", description="tool", style={"button_width": "70px"})
        self.size = W.IntSlider(value=max(2, w // 40), min=1, max=max(4, w // 4), description="size")
        self.opacity = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="opacity")
        self.outline = W.Checkbox(value=True, description="outline", indent=False)
        self.tolerance = W.FloatSlider(value=20.0, min=1.0, max=120.0, description="fill tol.")
        self.scale = W.FloatSlider(value=1.0, min=0.2, max=3.0, step=0.05, description="item scale")
        self.sam_mode = W.ToggleButtons(options=["positive", "negative", "box"], value="positive",
                                        style={"button_width": "70px"})
        self.undo_button = W.Button(description="undo", icon="undo")
        self.redo_button = W.Button(description="redo", icon="repeat")
        self.reset_button = W.Button(description="reset to saved", icon="refresh")
        self.clear_moves_button = W.Button(description="clear moves")
        self.status = W.HTML()
        self.undo_button.on_click(lambda _: self.state.undo())
        self.redo_button.on_click(lambda _: self.state.redo())
        self.reset_button.on_click(lambda _: self.state.reset())
        self.clear_moves_button.on_click(lambda _: self.state.clear_moves())
        self.scale.observe(self._scale_changed, names="value")
        for control in (self.opacity, self.outline):
            control.observe(lambda _: self.render(), names="value")
        self.state.observe(lambda _: self.render(), names="version")
        self.state.observe(self._selection_changed, names="selected")
        self.canvas.on_mouse_down(self.mouse_down)
        self.canvas.on_mouse_move(self.mouse_move)
        self.canvas.on_mouse_up(self.mouse_up)
        self.canvas.on_key_down(self.key_down)
        self._pressed = False
        self._points: list[tuple[float, float]] = []
        self._polygon: list[tuple[float, float]] = []
        self._sam_points: list[tuple[float, float]] = []
        self._sam_labels: list[int] = []
        self._drag_start: tuple[float, float] | None = None
        rows = [W.HBox([self.tool]), W.HBox([self.size, self.tolerance]),
                W.HBox([self.opacity, self.outline]), W.HBox([self.scale, self.clear_moves_button])]
        if prompter is not None:
            rows.append(W.HBox([W.Label("SAM:"), self.sam_mode]))
        rows.append(W.HBox([self.undo_button, self.redo_button, self.reset_button]))
        super().__init__([self.canvas, *rows, self.status], **kwargs)
        self.render()

    # --- drawing -------------------------------------------------------------------------------------
    def render_array(self) -> np.ndarray:
        """The picture on the canvas: image, visible items tinted, and the pending move's preview with its
        active region (moved items + refilled pixels) brightened."""
        labels, active = self.state.preview_moves()
        tinted = overlay(self.state.image, labels, self.opacity.value, self.outline.value)
        hidden = ~np.isin(labels, [k for k, v in enumerate(self.state.visible) if v])
        tinted[hidden] = self.state.image[hidden]
        if active.any():
            tinted[active] = (0.6 * tinted[active] + 0.4 * 255).astype(np.uint8)
        return tinted

    def render(self) -> None:
        with hold_canvas(self.canvas):
            self.canvas.clear()
            self.canvas.put_image_data(self.render_array(), 0, 0)
        areas = self.state.areas()
        k = self.state.selected
        moves = ", ".join(f"{self.state.names[i]}: dx={m.dx:.0f} dy={m.dy:.0f} x{m.scale:.2f}"
                          for i, m in self.state.moves.items())
        self.status.value = (f"<b>{self.tool.value}</b> · item {k} <b>{self.state.names[k]}</b> "
                             f"({areas[k]} px)" + (f" · pending moves: {moves}" if moves else ""))

    def _preview_dot(self, x: float, y: float) -> None:
        r, g, b = item_colour(self.state.selected)
        self.canvas.fill_style = "rgba(255,255,255,0.6)" if self.tool.value == "eraser" else f"rgba({r},{g},{b},0.7)"
        self.canvas.fill_circle(x, y, self.size.value)

    # --- events (called by ipycanvas, and by tests directly) ----------------------------------------
    def mouse_down(self, x: float, y: float) -> None:
        tool = self.tool.value
        self._pressed = True
        if tool in ("brush", "eraser", "lasso"):
            self._points = [(x, y)]
            self._preview_dot(x, y)
        elif tool == "fill":
            self.state.flood_fill(int(x), int(y), self.tolerance.value)
        elif tool == "polygon":
            if len(self._polygon) >= 3 and np.hypot(*np.subtract((x, y), self._polygon[0])) <= max(3, self.size.value):
                self.close_polygon()
            else:
                self._polygon.append((x, y))
                self.canvas.stroke_style = "white"
                if len(self._polygon) > 1:
                    self.canvas.stroke_line(*self._polygon[-2], x, y)
                self.canvas.fill_circle(x, y, 2)
        elif tool == "move":
            self.state.selected = self.state.item_at(x, y)
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
            self.canvas.line_width = 2 * self.size.value if self.tool.value != "lasso" else 1
            self.canvas.line_cap = "round"
            self.canvas.stroke_line(last[0], last[1], x, y)

    def mouse_up(self, x: float, y: float) -> None:
        if not self._pressed:
            return
        self._pressed = False
        tool = self.tool.value
        if tool in ("brush", "eraser"):
            if (x, y) != self._points[-1]:
                self._points.append((x, y))
            stroke = disk_stroke(self.state.labels.shape, self._points, self.size.value)
            self._points = []
            changed = self.state.assign(stroke) if tool == "brush" else self.state.erase(stroke)
            if not changed:
                self.render()  # clear the preview
        elif tool == "lasso":
            points, self._points = self._points + [(x, y)], []
            if len(points) < 3 or not self.state.polygon(points):
                self.render()
        elif tool == "move" and self._drag_start is not None:
            item = self.state.selected
            old = self.state.moves.get(item)
            dx = (old.dx if old else 0.0) + x - self._drag_start[0]
            dy = (old.dy if old else 0.0) + y - self._drag_start[1]
            self._drag_start = None
            self.state.set_move(item, dx=round(dx), dy=round(dy))
        elif tool == "sam" and self._drag_start is not None:
            self._sam_event(self._drag_start, (x, y))
            self._drag_start = None

    def key_down(self, key: str, shift_key: bool = False, ctrl_key: bool = False, meta_key: bool = False) -> None:
        mod = ctrl_key or meta_key
        if mod and key.lower() == "z":
            self.state.redo() if shift_key else self.state.undo()
        elif mod and key.lower() == "y":
            self.state.redo()
        elif key == "Enter" and self.tool.value == "polygon":
            self.close_polygon()
        elif key == "Escape":
            self._polygon, self._sam_points, self._sam_labels = [], [], []
            self.render()
        elif key == "[":
            self.size.value = max(self.size.min, self.size.value - 1)
        elif key == "]":
            self.size.value = min(self.size.max, self.size.value + 1)
        elif not mod and key in KEYS and KEYS[key] in self.tool.options:
            self.tool.value = KEYS[key]

    # --- tool helpers --------------------------------------------------------------------------------
    def close_polygon(self) -> None:
        points, self._polygon = self._polygon, []
        if len(points) >= 3:
            if not self.state.polygon(points):
                self.render()
        else:
            self.render()

    def _sam_event(self, start, end) -> None:
        if self.prompter is None:
            return
        if self.sam_mode.value == "box":
            x0, y0 = start
            x1, y1 = end
            mask = self.prompter.predict(box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        else:
            self._sam_points.append(end)
            self._sam_labels.append(1 if self.sam_mode.value == "positive" else 0)
            mask = self.prompter.predict(points=self._sam_points, point_labels=self._sam_labels)
        self.state.assign(mask)

    def _selection_changed(self, change) -> None:
        self._sam_points, self._sam_labels = [], []
        move = self.state.moves.get(change["new"])
        self.scale.unobserve(self._scale_changed, names="value")
        self.scale.value = move.scale if move else 1.0
        self.scale.observe(self._scale_changed, names="value")
        self.render()

    def _scale_changed(self, change) -> None:
        self.state.set_move(self.state.selected, scale=float(change["new"]))

    @property
    def labels(self) -> np.ndarray:
        return self.state.labels
