"""An ipycanvas mask editor: paint, erase, fill, draw polygons, prompt SAM, and drag/resize items.

The editor is split by job: :mod:`widgets.canvas_view` (the zoomed view, what is drawn, the status line),
:mod:`widgets.mask_tools` (the tools in image coordinates), :mod:`widgets.sam_tool` (SAM click and box
prompts); this module builds the widgets and turns mouse, wheel and key events into those calls.

Keys (active while the pointer is over the canvas, no click needed, and never while a text box has focus:
:class:`widgets.keys.CanvasKeys`): ``b e f p l m s`` choose a tool, ``[`` ``]`` brush size, ctrl+z / ctrl+shift+z / ctrl+y undo and redo, ``+`` ``-`` ``0`` zoom, arrows
pan, Enter closes a polygon, Escape cancels one. Every action also has a path without the mouse: the
coordinates box applies the current tool at typed image coordinates (Enter or its *apply* button).
"""
from __future__ import annotations

import html
import itertools

import ipywidgets as W
import numpy as np
from ipycanvas import Canvas

from dedit_nb.display import OVERLAY_MODES
from dedit_nb.segment.sam import SamClicks

from .canvas_view import MAX_CURSOR, CanvasView
from .keys import CanvasKeys
from .mask_tools import COORD_HINTS, MASK_TOOLS, TOOL_TIPS, TOOLS, MaskTools
from .sam_tool import SamTool
from .state import ItemState

__all__ = ["MASK_TOOLS", "MAX_CURSOR", "TOOLS", "MaskEditor"]

KEYS = {"b": "brush", "e": "eraser", "f": "fill", "p": "polygon", "l": "lasso", "m": "move", "s": "sam"}
_ids = itertools.count()


class MaskEditor(CanvasView, MaskTools, SamTool, W.VBox):
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
        self.sam_clicks = SamClicks()        # the clicks of the SAM mask being built (widgets.sam_tool)
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
            self._polygon = []
            self.forget_sam_clicks()
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
        self.forget_sam_clicks()
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
