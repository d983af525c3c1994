"""An ipycanvas mask editor: paint, erase, fill, draw polygons, prompt SAM, and drag/resize items.

The canvas is as large on screen as it is in canvas pixels, and shows a *view* of the image: scaled to fit
at zoom 1, magnified around the pointer by the wheel or the zoom buttons, panned by dragging with the space
bar held (or the arrow keys). The view is sampled from the image by nearest neighbour, so a 32 px image
shows crisp pixels, and sent as PNG, so items appear in exactly their palette colours. Mouse positions are
turned into image coordinates (pixel (floor(y), floor(x))); the public ``mouse_down``/``mouse_move``/
``mouse_up`` take image coordinates. While the mouse is down only client-side preview shapes are drawn; the
stroke is applied to the label map as one operation on release and the view is sent once.

Keys (active while the pointer is over the canvas, no click needed, and never while a text box has focus:
:class:`widgets.keys.CanvasKeys`): ``b e f p l m s`` choose a tool, ``[`` ``]`` brush size, ctrl+z / ctrl+shift+z / ctrl+y undo and redo, ``+`` ``-`` ``0`` zoom, arrows
pan, Enter closes a polygon, Escape cancels one. Every action also has a path without the mouse: the
coordinates box applies the current tool at typed image coordinates (Enter or its *apply* button).
"""
from __future__ import annotations

import html
import io
import itertools
import re
import urllib.parse

import ipywidgets as W
import numpy as np
from ipycanvas import Canvas, hold_canvas
from PIL import Image

from dedit_nb.display import OVERLAY_MODES, item_colour, item_overlay

from .keys import CanvasKeys
from .state import ItemState, disk_stroke

TOOLS = ("brush", "eraser", "fill", "polygon", "lasso", "move", "sam")
MASK_TOOLS = tuple(t for t in TOOLS if t != "move")   # segmentation: moving an item is 03's edit, not a mask tool
KEYS = {"b": "brush", "e": "eraser", "f": "fill", "p": "polygon", "l": "lasso", "m": "move", "s": "sam"}
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
MAX_CURSOR = 128       # browsers ignore cursor images larger than this; a larger brush is drawn in the canvas
CURSORS = {"fill": "cell", "polygon": "crosshair", "lasso": "crosshair", "move": "move", "sam": "crosshair"}
MAX_ZOOM = 16.0
_ids = itertools.count()


def fast_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG at zlib level 1: a 640x640 photo view in about a tenth of the default level's time."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


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


class MaskEditor(W.VBox):
    """Edit an :class:`ItemState` on a canvas. Every change goes through the state (undoable, observable)."""

    def __init__(self, state: ItemState, display_width: int = 640, prompter=None, tools=TOOLS,
                 save_marker: bool = True, **kwargs):
        self.state = state
        self.save_marker = save_marker      # "saved / unsaved changes" in the status, where there is a save
        self.show_moves = True              # draw pending moves (03 shows them only for its move edit)
        self.prompter = prompter            # a dedit_nb.segment.sam.SamPrompter for click/box prompts
        h, w = state.labels.shape
        self.view_width, self.view_height = int(display_width), max(1, round(display_width * h / w))
        self.base_scale = self.view_width / w           # screen pixels per image pixel at zoom 1
        self.zoom, self.origin = 1.0, (0.0, 0.0)        # the view: magnification and top-left image point
        self.css_class = f"dedit-canvas-{next(_ids)}"
        # at most as wide as the page allows; ipycanvas maps pointer positions through the shown size
        self.canvas = Canvas(width=self.view_width, height=self.view_height,
                             layout=W.Layout(width=f"{self.view_width}px", max_width="100%", height="auto"))
        self.canvas.add_class(self.css_class)
        self.cursor_style = W.HTML(layout=W.Layout(display="none"))  # a <style> for the canvas cursor
        # the view travels as a lossless PNG that we encode fast (put_image_data would send RGB as JPEG,
        # shifting item colours, or RGBA as a slowly compressed PNG)
        self.frame = W.Image(format="png")
        tools = [t for t in tools if t in TOOLS and (t != "sam" or prompter is not None)]
        self.tool = W.ToggleButtons(options=[(t if t != "sam" else "SAM", t) for t in tools], value=tools[0],
                                    tooltips=[TOOL_TIPS[t] for t in tools], style={"button_width": "76px"})
        wide = {"description_width": "initial"}
        self.size = W.IntSlider(value=max(2, w // 40), min=1, max=max(4, w // 4), description="brush size",
                                style=wide)
        self.overlay_mode = W.ToggleButtons(options=list(OVERLAY_MODES), value="outline",
                                            tooltips=["item borders in item colours over the image",
                                                      "items filled with their colours"],
                                            style={"button_width": "70px"})
        self.tolerance = W.FloatSlider(value=20.0, min=1.0, max=120.0, description="fill tolerance", style=wide)
        self.scale = W.FloatSlider(value=1.0, min=0.2, max=3.0, step=0.05, description="item scale", style=wide)
        self.sam_mode = W.ToggleButtons(options=["positive", "negative", "box"], value="positive",
                                        tooltips=["a click adds a point inside the object",
                                                  "a click adds a point outside the object",
                                                  "drag a box around the object"],
                                        style={"button_width": "76px"})
        # every button its own Layout: hiding one (03 hides 'apply moves') must not hide the others
        button = lambda text, icon, tip: W.Button(description=text, icon=icon, tooltip=tip,  # noqa: E731
                                                  layout=W.Layout(width="auto", flex="0 0 auto"))
        self.undo_button = button("undo", "undo", "undo (ctrl+z)")
        self.redo_button = button("redo", "repeat", "redo (ctrl+shift+z or ctrl+y)")
        self.reset_button = button("reset to saved", "refresh", "back to the last saved items (undoable)")
        self.apply_moves_button = button("apply moves", "check", "make the pending moves part of the items")
        self.clear_moves_button = button("clear moves", "times", "drop every pending move")
        self.zoom_in_button = button("", "search-plus", "zoom in (+, or the mouse wheel)")
        self.zoom_out_button = button("", "search-minus", "zoom out (-)")
        self.fit_button = button("fit", "expand", "show the whole image (0)")
        self.coords = W.Text(placeholder=COORD_HINTS["brush"], layout=W.Layout(width="260px"),
                             continuous_update=False)
        self.coords.add_class(f"{self.css_class}-coords")
        self.apply_coords_button = button("apply", "keyboard-o", "apply the current tool at these image coordinates")
        self.status = W.HTML(layout=W.Layout(width="100%", margin="0"))  # one line, cut at the canvas width
        self.status.add_class(f"{self.css_class}-status")
        self.message = W.HTML()
        self._message_version = -1
        self.undo_button.on_click(lambda _: self.state.undo())
        self.redo_button.on_click(lambda _: self.state.redo())
        self.reset_button.on_click(lambda _: self.state.reset())
        self.apply_moves_button.on_click(lambda _: self.state.apply_moves())
        self.clear_moves_button.on_click(lambda _: self.state.clear_moves())
        self.zoom_in_button.on_click(lambda _: self.zoom_by(2.0))
        self.zoom_out_button.on_click(lambda _: self.zoom_by(0.5))
        self.fit_button.on_click(lambda _: self.set_view(1.0, (0.0, 0.0)))
        self.apply_coords_button.on_click(lambda _: self._guard(lambda: self.apply_coordinates(self.coords.value)))
        self.scale.observe(self._scale_changed, names="value")
        self.overlay_mode.observe(lambda _: self.render(), names="value")
        self.tool.observe(self._tool_changed, names="value")
        self.tool.layout.display = "none" if len(tools) == 1 else None
        self.size.observe(self._size_changed, names="value")
        self.state.observe(self._state_changed, names="version")
        self.state.observe(self._selection_changed, names="selected")
        self.canvas.on_mouse_down(self._canvas_down)
        self.canvas.on_mouse_move(self._canvas_move)
        self.canvas.on_mouse_up(self._canvas_up)
        self.canvas.on_mouse_out(lambda u, v: self._draw_brush_outline(None, None) if self.brush_in_canvas else None)
        self._keys = CanvasKeys(self._key_event, canvas_class=self.css_class,
                                submit_class=f"{self.css_class}-coords")
        self._wheel = self._watch_wheel()
        self._pressed = False
        self._panning: tuple[float, float] | None = None
        self._space = False
        self._points: list[tuple[float, float]] = []
        self._polygon: list[tuple[float, float]] = []
        self._sam_points: list[tuple[float, float]] = []
        self._sam_labels: list[int] = []
        self._drag_start: tuple[float, float] | None = None
        row = lambda children: W.HBox(children, layout=W.Layout(flex_flow="row wrap"))  # noqa: E731 - wraps, never overflows
        self.rows = {
            "size": row([self.size]),
            "fill": row([self.tolerance]),
            "move": row([self.scale, self.apply_moves_button, self.clear_moves_button]),
            "sam": row([W.Label("SAM prompt:"), self.sam_mode]),
        }
        self.coords_row = row([W.Label("coordinates:"), self.coords, self.apply_coords_button])
        rows = [row([self.tool]), *self.rows.values(),
                row([W.Label("show items as"), self.overlay_mode, self.zoom_in_button, self.zoom_out_button,
                     self.fit_button]),
                row([self.undo_button, self.redo_button, self.reset_button]),
                self.coords_row]
        kwargs.setdefault("layout", W.Layout(width=f"{self.view_width}px", max_width="100%", flex="0 1 auto"))
        super().__init__([self.cursor_style, self._keys, self.canvas, self.status, self.message, *rows], **kwargs)
        self._tool_changed()

    def _watch_wheel(self):
        """The wheel over the canvas (ipyevents; wheel events take no focus, unlike its key events)."""
        from ipyevents import Event
        events = Event(source=self.canvas, watched_events=["wheel"], prevent_default_action=True)
        events.on_dom_event(self.handle_event)
        return events

    def _key_event(self, event: dict) -> None:
        """A message of :class:`CanvasKeys`: Enter in the coordinates box, or a key over the canvas."""
        if event.get("type") == "submit":
            self.coords.value = str(event.get("value", ""))
            self._guard(lambda: self.apply_coordinates(self.coords.value))
        else:
            self.handle_event(event)

    # --- the view ------------------------------------------------------------------------------------
    @property
    def view_scale(self) -> float:
        """Screen pixels per image pixel."""
        return self.base_scale * self.zoom

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Canvas point (u, v) -> image point (x, y)."""
        s = self.view_scale
        return self.origin[0] + u / s, self.origin[1] + v / s

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        s = self.view_scale
        return (x - self.origin[0]) * s, (y - self.origin[1]) * s

    def set_view(self, zoom: float, origin: tuple[float, float]) -> None:
        """Zoom (1 = fit, up to 16) and top-left image point, kept inside the image."""
        h, w = self.state.labels.shape
        self.zoom = float(min(max(zoom, 1.0), MAX_ZOOM))
        s = self.view_scale
        ox = min(max(origin[0], 0.0), max(0.0, w - self.view_width / s))
        oy = min(max(origin[1], 0.0), max(0.0, h - self.view_height / s))
        self.origin = (ox, oy)
        self.render()
        self._update_cursor()

    def zoom_by(self, factor: float, about: tuple[float, float] | None = None) -> None:
        """Zoom by ``factor`` keeping canvas point ``about`` (default: the centre) on the same image point."""
        u, v = about if about is not None else (self.view_width / 2, self.view_height / 2)
        x, y = self.to_image(u, v)
        zoom = min(max(self.zoom * factor, 1.0), MAX_ZOOM)
        s = self.base_scale * zoom
        self.set_view(zoom, (x - u / s, y - v / s))

    def pan_by(self, du: float, dv: float) -> None:
        """Move the view by (du, dv) screen pixels."""
        s = self.view_scale
        self.set_view(self.zoom, (self.origin[0] + du / s, self.origin[1] + dv / s))

    # --- drawing -------------------------------------------------------------------------------------
    def render_array(self) -> np.ndarray:
        """The whole image as drawn, at image size: items in their colours (outline or solid, hidden
        items plain) over the pending moves' preview, its active region (moved items + refilled pixels)
        brightened (without the preview when ``show_moves`` is off)."""
        labels, active = self.state.preview_moves() if self.show_moves else (self.state.labels, None)
        picture = item_overlay(self.state.image, labels, self.overlay_mode.value, self.state.visible)
        if active is not None and active.any():
            picture[active] = (0.6 * picture[active] + 0.4 * 255).astype(np.uint8)
        return picture

    def view_array(self) -> np.ndarray:
        """What the canvas shows: the view of ``render_array`` at screen size, nearest neighbour."""
        h, w = self.state.labels.shape
        s = self.view_scale
        rows = np.clip(np.floor(self.origin[1] + (np.arange(self.view_height) + 0.5) / s).astype(int), 0, h - 1)
        cols = np.clip(np.floor(self.origin[0] + (np.arange(self.view_width) + 0.5) / s).astype(int), 0, w - 1)
        return self.render_array()[rows[:, None], cols[None, :]]

    def render(self) -> None:
        with hold_canvas(self.canvas):
            self.canvas.clear()
            self.frame.value = fast_png(self.view_array())
            self.canvas.draw_image(self.frame, 0, 0)
            if len(self._polygon) > 0:
                self.canvas.stroke_style = "white"
                self.canvas.line_width = 1
                for a, b in zip(self._polygon[:-1], self._polygon[1:]):
                    self.canvas.stroke_line(*self.to_canvas(*a), *self.to_canvas(*b))
        self.undo_button.disabled = not self.state.can_undo
        self.redo_button.disabled = not self.state.can_redo
        self.apply_moves_button.disabled = self.clear_moves_button.disabled = not self.state.moves
        if self.state.version != self._message_version:
            self.message.value = ""            # a message answers one action; the next change clears it
        self.status.value = self.status_html()

    def status_html(self) -> str:
        """One line, never wider than the canvas (the rest is cut with … and shown whole as its tooltip)."""
        state, k = self.state, self.state.selected
        r, g, b = item_colour(k)
        moves = ", ".join(f"{state.names[i]}: dx={m.dx:g} dy={m.dy:g} ×{m.scale:g}" for i, m in state.moves.items())
        tool = self.tool.value
        detail = f" {self.size.value}px" if tool in ("brush", "eraser") else (
            f" ({self.sam_mode.value})" if tool == "sam" else "")
        if not self.save_marker:
            saved = ""
        elif state.stale:
            saved = (" · <span class='dedit-stale' style='color:#b00020'>⚠ the session's items changed since "
                     "this editor loaded them</span>")
        elif state.dirty:
            saved = " · <span class='dedit-dirty' style='color:#c05000'>● unsaved changes</span>"
        else:
            saved = " · <span class='dedit-clean' style='color:#2e7d32'>saved</span>"
        pending = f" · pending moves: {html.escape(moves)}" if moves and self.show_moves else ""
        tool_part = f"tool <b class='dedit-tool'>{tool}{detail}</b> · " if len(self.tool.options) > 1 else ""
        line = (f"{tool_part}item {k} "
                f"<span style='display:inline-block;width:10px;height:10px;background:rgb({r},{g},{b})'></span> "
                f"<b>{html.escape(state.names[k])}</b> ({state.areas()[k]} px) · zoom ×{self.zoom:g}{saved}{pending}")
        whole = re.sub(r"<[^>]*>", "", line)         # the tooltip: the same line as text (still escaped)
        return (f"<div class='dedit-status' title='{whole}' style='white-space:nowrap;overflow:hidden;"
                f"text-overflow:ellipsis;line-height:20px'>{line}</div>")

    def say(self, text: str, error: bool = False) -> None:
        """Show a message (escaped) until the items change again."""
        colour = "#b00020" if error else "#333"
        self.message.value = (f"<span class='{'dedit-error' if error else 'dedit-note'}' style='color:{colour}'>"
                              f"{'⚠ ' if error else ''}{html.escape(str(text))}</span>")
        self._message_version = self.state.version

    def _guard(self, action):
        try:
            return action()
        except ValueError as exc:          # PartitionError too: shown, nothing changed
            self.say(str(exc), error=True)
            return None

    @property
    def brush_in_canvas(self) -> bool:
        """True when the brush outline is too large for a cursor image and is drawn in the canvas instead."""
        return self.tool.value in ("brush", "eraser") and 2 * self.size.value * self.view_scale + 2 > MAX_CURSOR

    def _update_cursor(self) -> None:
        """A CSS cursor: the brush outline at its current size on screen, else a tool cursor."""
        tool = self.tool.value
        if self._space:
            cursor = "grab"
        elif tool in ("brush", "eraser") and not self.brush_in_canvas:
            d = 2 * self.size.value * self.view_scale
            n = int(np.ceil(d)) + 2
            svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{n}' height='{n}'>"
                   f"<circle cx='{n / 2}' cy='{n / 2}' r='{d / 2}' fill='none' stroke='black' stroke-width='1.5'/>"
                   f"<circle cx='{n / 2}' cy='{n / 2}' r='{max(d / 2 - 1, 0.5)}' fill='none' stroke='white'/></svg>")
            cursor = f"url(\"data:image/svg+xml,{urllib.parse.quote(svg)}\") {n // 2} {n // 2}, crosshair"
        else:
            cursor = CURSORS.get(tool, "crosshair")
        self.cursor_style.value = (f"<style>.{self.css_class}, .{self.css_class} canvas {{cursor: {cursor}; "
                                   f"image-rendering: pixelated}} .{self.css_class}-status .widget-html-content "
                                   f"{{min-width: 0; width: 100%}}</style>")   # lets the status line end in …

    def _preview_dot(self, x: float, y: float) -> None:
        r, g, b = item_colour(self.state.selected)
        self.canvas.fill_style = "rgba(255,255,255,0.6)" if self.tool.value == "eraser" else f"rgba({r},{g},{b},0.7)"
        self.canvas.fill_circle(*self.to_canvas(x, y), self.size.value * self.view_scale)

    # --- canvas events: screen -> image coordinates, or panning -------------------------------------
    def _canvas_down(self, u: float, v: float) -> None:
        if self._space:
            self._panning = (u, v)
            return
        self.mouse_down(*self.to_image(u, v))

    def _canvas_move(self, u: float, v: float) -> None:
        if self._panning is not None:
            self.pan_by(self._panning[0] - u, self._panning[1] - v)
            self._panning = (u, v)
            return
        if not self._pressed and self.brush_in_canvas:
            self._draw_brush_outline(u, v)
        self.mouse_move(*self.to_image(u, v))

    def _draw_brush_outline(self, u: float | None, v: float | None) -> None:
        """The brush's outline around the pointer (none once it left), in the canvas (the view is redrawn from
        the image already in the page: nothing but the drawing commands travels)."""
        with hold_canvas(self.canvas):
            self.canvas.clear()
            self.canvas.draw_image(self.frame, 0, 0)
            if u is None:
                return
            self.canvas.line_width = 1.5
            self.canvas.stroke_style = "white"
            self.canvas.stroke_circle(u, v, self.size.value * self.view_scale)

    def _canvas_up(self, u: float, v: float) -> None:
        if self._panning is not None:
            self._panning = None
            return
        self.mouse_up(*self.to_image(u, v))

    def handle_event(self, event: dict) -> None:
        """An ipyevents event: keys while the pointer is over the canvas, and the wheel."""
        kind = event.get("type")
        if kind == "wheel":
            factor = 1.25 if event.get("deltaY", 0) < 0 else 0.8
            # relativeX/Y are CSS pixels of the canvas as shown, which is narrower than its pixels on a small page
            ratio = self.view_width / (event.get("boundingRectWidth") or self.view_width)
            about = ((event["relativeX"] * ratio, event["relativeY"] * ratio) if "relativeX" in event
                     else (self.view_width / 2, self.view_height / 2))
            self.zoom_by(factor, about)
        elif kind == "keydown":
            self.key_down(event.get("key", ""), event.get("shiftKey", False), event.get("ctrlKey", False),
                          event.get("metaKey", False))
        elif kind == "keyup" and event.get("key") == " ":
            self._space, self._panning = False, None
            self._update_cursor()

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

    def key_down(self, key: str, shift_key: bool = False, ctrl_key: bool = False, meta_key: bool = False) -> None:
        mod = ctrl_key or meta_key
        pan = {"ArrowLeft": (-1, 0), "ArrowRight": (1, 0), "ArrowUp": (0, -1), "ArrowDown": (0, 1)}
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
        elif key in ("+", "="):
            self.zoom_by(2.0)
        elif key == "-":
            self.zoom_by(0.5)
        elif key == "0":
            self.set_view(1.0, (0.0, 0.0))
        elif key in pan:
            self.pan_by(pan[key][0] * self.view_width / 4, pan[key][1] * self.view_height / 4)
        elif key == " ":
            self._space = True
            self._update_cursor()
        elif not mod and key in KEYS and KEYS[key] in TOOLS and any(v == KEYS[key] for _, v in self.tool.options):
            self.tool.value = KEYS[key]

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

    def _sam_event(self, start, end) -> int:
        if self.prompter is None:
            raise ValueError("no SAM model: pass prompter=SamPrompter(...) to use SAM prompts")
        if self.sam_mode.value == "box":
            x0, y0 = start
            x1, y1 = end
            mask = self.prompter.predict(box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        else:
            self._sam_points.append(end)
            self._sam_labels.append(1 if self.sam_mode.value == "positive" else 0)
            mask = self.prompter.predict(points=self._sam_points, point_labels=self._sam_labels)
        return self.state.assign(mask)

    def _tool_changed(self, change=None) -> None:
        tool = self.tool.value
        shown = {"size": tool in ("brush", "eraser"), "fill": tool == "fill", "move": tool == "move",
                 "sam": tool == "sam"}
        for name, row in self.rows.items():
            row.layout.display = None if shown[name] else "none"
        self.coords.placeholder = COORD_HINTS[tool]
        self._polygon, self._points = [], []
        self._pressed, self._drag_start = False, None   # a tool key mid-drag ends the drag: later moves are ignored
        self._update_cursor()
        self.render()

    def _size_changed(self, change) -> None:
        self._update_cursor()
        self.status.value = self.status_html()

    def _selection_changed(self, change) -> None:
        self._sam_points, self._sam_labels = [], []
        move = self.state.moves.get(change["new"])
        self._set_scale_quietly(move.scale if move else 1.0)
        self.render()

    def _state_changed(self, change) -> None:
        move = self.state.moves.get(self.state.selected)      # 'apply moves', undo...: the slider follows
        self._set_scale_quietly(move.scale if move else 1.0)
        self.render()

    def _set_scale_quietly(self, value: float) -> None:
        self.scale.unobserve(self._scale_changed, names="value")
        self.scale.value = value
        self.scale.observe(self._scale_changed, names="value")

    def _scale_changed(self, change) -> None:
        try:
            self.state.set_move(self.state.selected, scale=float(change["new"]))
        except ValueError as exc:
            move = self.state.moves.get(self.state.selected)
            self._set_scale_quietly(move.scale if move else 1.0)
            self.say(str(exc), error=True)

    @property
    def labels(self) -> np.ndarray:
        return self.state.labels
