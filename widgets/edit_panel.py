"""Interactive edits: choose an edit and an item, type a prompt, drag items or draw a new mask; collect several
operations in a list, press Generate."""
from __future__ import annotations

import html
import time
from dataclasses import asdict

import ipywidgets as W
import numpy as np

from dedit_nb.display import tidy_number
from dedit_nb.edits import Editor
from dedit_nb.parameters import OPERATIONS, SAMPLING
from dedit_nb.sampler import SamplingConfig
from dedit_nb.session import png_bytes

from .gallery import ResultGallery, upscale
from .mask_editor import MASK_TOOLS, MaskEditor
from .mask_tools import parse_points
from .operation_list import OperationList
from .state import ItemState

EDIT_TIPS = {
    "recon": "regenerate the image from its item prompts (checks the finetune)",
    "text": "replace the item's prompt ('a red bag'), or refine it ('a photo of * in gold', * = the item)",
    "image": "put an item learned from another image in the item's place",
    "move": "move / resize items: drag them in the canvas, set 'item scale'",
    "remove": "delete the item; its pixels go to its neighbours and are regenerated",
    "add": "a new item with a text prompt: draw its mask or give a box; it takes the pixels of the items beneath",
    "reshape": "give the item a new mask: redraw it, or give a box",
}
# The panel's control of each operation field (the schemas, dedit_nb.parameters.OPERATIONS, say which fields
# an edit has). A move takes its items and shifts from the canvas drags (a redrawn mask is reshape's); another
# session's item (source_session) and a mask file are the API's.
FIELD_CONTROLS = {"item": "item", "prompt": "prompt", "template": "template", "name": "name",
                  "source_image": "source", "source_item": "source", "dx": "moves", "dy": "moves", "scale": "moves",
                  "mask": "pixels", "box": "pixels"}
CANVAS_FIELDS = {"move": ("dx",)}
# the right end of a slider whose field has no upper bound (a value past it widens the slider), and steps
SLIDER_HIGH = {"steps": 100, "guidance": 12.0, "num_images": 8, "edge_thickness": 8}
SLIDER_STEP = {"guidance": 0.5}             # else 1 for integers, 0.05 for numbers
SAMPLING_LABELS = {"edge_thickness": "soft band", "num_images": "images", "scheduler": "sampler"}
DRAW_TOOLS = tuple(t for t in MASK_TOOLS if t != "sam")
# A click that reaches the kernel this soon after an edit finished was queued while it ran (the kernel takes
# the next message at once): the second click of a double-click, not a request for another edit. Anyone
# asking for another edit has first seen this one end, which takes longer.
QUEUED_CLICK_S = 0.1


def sampling_control(field, value, size: int) -> W.Widget:
    """The control of one sampling field (:data:`dedit_nb.parameters.SAMPLING`): its widget hint, its help as
    the tooltip, starting at ``value``."""
    description = SAMPLING_LABELS.get(field.name, field.name)
    common = dict(value=value, description=description, tooltip=field.help)
    if field.choices:      # and a value the field takes besides them (a diffusers scheduler class name)
        return W.Dropdown(options=list(dict.fromkeys([*field.choices, value])), **common)
    if field.widget == "slider":
        high = field.high if field.high is not None else SLIDER_HIGH[field.name]
        if field.name == "edge_thickness":
            high = max(high, size // 4)                # up to a quarter of the image
        slider = W.IntSlider if field.type == "int" else W.FloatSlider
        return slider(min=field.low, max=max(high, value), step=SLIDER_STEP.get(field.name, 1 if field.type == "int"
                                                                                 else 0.05), **common)
    return W.IntText(**common) if field.type == "int" else W.FloatText(**common)


class EditPanel(W.VBox):
    """Controls for one session image over a finetuned model; results collect in a gallery.

    Each edit's controls are its operation's fields (:data:`dedit_nb.parameters.OPERATIONS`); the sampling
    controls are :data:`dedit_nb.parameters.SAMPLING`'s, starting from the model profile's values and
    ``sampling`` (03_edit passes its resolved parameters). "add to list" collects operations (``edits``, a
    list of operation dicts, starts the list); Generate samples the listed ones together in one pass
    (:meth:`Editor.run <dedit_nb.edits.Editor.run>`), or the edit the controls show when the list is empty. The item dropdown and the canvas share one selection; a move uses the
    moves dragged in the canvas; add and reshape draw their mask in a second canvas (or take a box).
    """

    def __init__(self, model, session, image=0, display_width: int = 384, edit: str = "text", item=None,
                 prompt: str = "", sampling: dict | None = None, edits: list[dict] | None = None):
        self.editor_backend = Editor(model, session)
        self.session, self.image = session, image
        self.entry = entry = session.image(image)
        self.state = ItemState.from_session(session, image)
        # nothing to save here (moves feed the move edit, not the items): no saved marker, no 'apply moves'
        self.canvas = MaskEditor(self.state, display_width=display_width, tools=("move",), save_marker=False)
        self.canvas.apply_moves_button.layout.display = "none"
        # add / reshape: the new mask, painted as item 1 over the rest (item 0) in a second canvas, made when first
        # needed (until then the page has one canvas's controls)
        self.drawing = ItemState(entry.working, np.zeros(entry.labels.shape, np.int32), ["rest", "new mask"])
        self.draw_canvas: MaskEditor | None = None
        self.display_width = display_width
        wide = {"description_width": "initial"}
        kinds = list(OPERATIONS)
        self.kind = W.ToggleButtons(options=kinds, value=edit, description="edit",
                                    tooltips=[EDIT_TIPS[k] for k in kinds], style={"button_width": "80px"})
        fields = {f.name: f for schema in OPERATIONS.values() for f in schema}
        self.item = W.Dropdown(options=[(f"{k}: {it.name}", k) for k, it in enumerate(entry.items)],
                               description="item")
        if item is not None and item != "":
            self.item.value = entry.item_index(item)
        self.state.selected = self.item.value
        W.link((self.item, "value"), (self.state, "selected"))       # one selection: dropdown == canvas
        self.prompt = W.Text(value=prompt or fields["prompt"].default, description="prompt",
                             placeholder="a red bag  /  a photo of * in gold")
        self.template = W.Text(value=fields["template"].default or "", description="template",
                               placeholder="optional: a photo of * in gold")
        self.item_name = W.Text(value=fields["name"].default, description="name")
        sources = [(f"{e.name} · {k}: {it.name}", (i, k))
                   for i, e in enumerate(session.images) for k, it in enumerate(e.items)]
        self.source = W.Dropdown(options=sources, description="source item", style=wide)
        self.moves_hint = W.HTML("<i>drag items in the canvas (move tool); 'item scale' resizes the selected "
                                 "one</i>")
        self.pixel_source = W.ToggleButtons(options=["draw", "box"], value="draw", description="mask",
                                            tooltips=["paint the mask in the canvas", fields["box"].help],
                                            style={"button_width": "60px"})
        self.box = W.Text(placeholder="x0, y0, x1, y1", description="box", tooltip=fields["box"].help)
        self.pixels = W.VBox([self.pixel_source, self.box])
        given = {k: v for k, v in (sampling or {}).items() if k != "profile"}    # how 03 resolved them: ours again
        start = asdict(SamplingConfig.for_model(model, **given))
        size = max(entry.labels.shape)
        self.sampling_controls = {f.name: sampling_control(f, start[f.name], size)
                                  for f in SAMPLING if f.widget != "none"}
        c = self.sampling_controls
        self.strength, self.guidance, self.steps, self.edge = (c["strength"], c["guidance"], c["steps"],
                                                               c["edge_thickness"])
        self.seed, self.num_images, self.scheduler = c["seed"], c["num_images"], c["scheduler"]
        self.operations = OperationList(self.current_operations, [it.name for it in entry.items], self.show_error,
                                        edits, self.earlier_requests())
        self.generate = W.Button(description="Generate", icon="magic", button_style="primary",
                                 layout=W.Layout(width="auto"))
        self.error = W.HTML()
        self.progress = W.IntProgress(value=0, min=0, max=1, description="sampling",
                                      layout=W.Layout(display="none"))
        self.preview_width = display_width // 2
        self.preview = W.Image(format="png", layout=W.Layout(width=f"{self.preview_width}px", display="none"))
        self.gallery = ResultGallery(session)
        self._finished = -QUEUED_CLICK_S
        self.generate.on_click(self._clicked)
        self.kind.observe(lambda _: self._kind_changed(), names="value")
        self.item.observe(lambda _: self._load_drawing() if self.kind.value == "reshape" else None, names="value")
        self.pixel_source.observe(lambda _: self._kind_changed(), names="value")
        self.controls = {"item": self.item, "prompt": self.prompt, "template": self.template, "name": self.item_name,
                         "source": self.source, "moves": self.moves_hint, "pixels": self.pixels}
        self.blending = (self.strength, self.edge)                   # no blending in a recon: hidden there
        for control in (self.kind, *self.controls.values(), self.pixel_source, self.box,
                        *self.sampling_controls.values()):
            control.observe(lambda _: setattr(self.error, "value", ""), names="value")   # an error answers one try
        for state in (self.state, self.drawing):
            state.observe(lambda _: setattr(self.error, "value", ""), names="version")
        column = W.VBox([self.kind, *self.controls.values(), *self.sampling_controls.values(), self.operations,
                         self.generate, self.progress, self.preview], layout=W.Layout(max_width="100%"))
        self.board = W.HBox([self.canvas, column], layout=W.Layout(flex_flow="row wrap"))
        super().__init__([self.board, self.error, self.gallery])
        self._kind_changed()

    def shown_controls(self, kind: str) -> set[str]:
        """The controls an edit shows: those of its operation's fields."""
        names = CANVAS_FIELDS.get(kind, OPERATIONS[kind].names)
        return {FIELD_CONTROLS[n] for n in names if n in FIELD_CONTROLS}

    def _kind_changed(self) -> None:
        kind = self.kind.value
        used = self.shown_controls(kind)
        for field in OPERATIONS[kind]:      # each field's help ('prompt' differs in a text edit and an add)
            control = self.controls.get(FIELD_CONTROLS.get(field.name))
            if control is not None and hasattr(control, "tooltip"):
                control.tooltip = field.help
        for name, control in self.controls.items():
            control.layout.display = None if name in used else "none"
        for row in (self.canvas.rows["move"], self.canvas.coords_row):      # item scale, moves by dx,dy
            row.layout.display = None if "moves" in used else "none"
        for control in self.blending:
            control.layout.display = "none" if kind == "recon" else None
        drawing = "pixels" in used and self.pixel_source.value == "draw"
        self.box.layout.display = None if "pixels" in used and not drawing else "none"
        self.canvas.layout.display = "none" if drawing else None
        if drawing and self.draw_canvas is None:
            self.draw_canvas = MaskEditor(self.drawing, display_width=self.display_width, tools=DRAW_TOOLS,
                                          save_marker=False)
            self.board.children = (self.canvas, self.draw_canvas, *self.board.children[1:])
        if self.draw_canvas is not None:
            self.draw_canvas.layout.display = None if drawing else "none"
        if "pixels" in used:
            self._load_drawing()
        self.canvas.show_moves = "moves" in used                             # pending moves only for a move
        self.canvas.render()

    def _load_drawing(self) -> None:
        """Start the mask canvas from nothing (add) or from the chosen item's mask (reshape)."""
        start = self.entry.labels == self.item.value if self.kind.value == "reshape" else False
        self.drawing.load(np.broadcast_to(start, self.entry.labels.shape).astype(np.int32), self.drawing.names,
                          self.drawing.templates)
        self.drawing.selected = 1

    def drawn_pixels(self) -> dict:
        """The mask of an add or reshape as its operation field: the drawn one, or the typed box."""
        if self.pixel_source.value == "box":
            points = parse_points(self.box.value)
            if len(points) != 2:
                raise ValueError(f"a box is x0, y0, x1, y1 (two corners), got {self.box.value!r}")
            return {"box": [v for point in points for v in point]}
        mask = self.drawing.labels == 1
        if not mask.any():
            raise ValueError("paint the mask in the canvas first (or choose 'box' and type its corners)")
        return {"mask": mask}

    def current_operations(self) -> list[dict]:
        """The operations the controls describe now (a move: one per item dragged in the canvas), as dicts of
        their schema's fields."""
        kind = self.kind.value
        if kind == "move":
            if not self.state.moves:
                raise ValueError("drag an item with the move tool (or set its scale) first")
            return [{"kind": "move", "item": k, "dx": tidy_number(m.dx), "dy": tidy_number(m.dy),
                     "scale": tidy_number(m.scale)} for k, m in self.state.moves.items()]
        source_image, source_item = self.source.value
        values = {"item": self.item.value, "prompt": self.prompt.value, "template": self.template.value or None,
                  "name": self.item_name.value, "source_image": source_image, "source_item": source_item}
        if "pixels" in self.shown_controls(kind):
            values.update(self.drawn_pixels())
        return [{"kind": kind, **{n: values[n] for n in OPERATIONS[kind].names if n in values}}]

    def sampling(self) -> dict:
        # sliders step in binary fractions of 0.05: 5.000000000000001 would reach the manifest
        return {name: tidy_number(c.value) if isinstance(c.value, float) else c.value
                for name, c in self.sampling_controls.items()}

    def show_error(self, text) -> None:
        self.error.value = (f"<div class='dedit-error' style='color:#b00020;background:#fdecea;border-left:4px "
                            f"solid #b00020;padding:4px 8px'>⚠ not generated: {html.escape(str(text))}</div>")

    def show_progress(self, step: int, total: int, image: np.ndarray | None = None) -> None:
        """Progress of the running edit, with a preview picture when one is given (the sampler's step hook)."""
        self.progress.layout.display = None
        self.progress.max, self.progress.value = max(int(total), 1), int(step)
        if image is not None:
            self.preview.value = png_bytes(np.asarray(image, np.uint8))
            self.preview.layout.display = None

    def show_step(self, run, step: int, timestep, callback_kwargs: dict) -> dict:
        """The sampler's ``callback_on_step_end``: the progress bar and the first image's current estimate."""
        self.show_progress(step + 1, run.num_timesteps, upscale(run.preview()[0], self.preview_width))
        return callback_kwargs

    def _clicked(self, _) -> None:
        if time.monotonic() - self._finished >= QUEUED_CLICK_S:
            self.run()

    def run(self):
        """Generate: the listed operations in one pass, or the one the controls show when the list is empty."""
        self.error.value = ""
        self.generate.disabled, self.generate.description = True, "running…"
        self.show_progress(0, self.steps.value)
        try:
            edits = self.operations.operations or self.current_operations()
            result = self.editor_backend.run(self.image, edits, callback_on_step_end=self.show_step,
                                             **self.sampling())
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            self.show_error(exc)
            return None
        finally:
            self.generate.disabled, self.generate.description = False, "Generate"
            self.progress.layout.display = self.preview.layout.display = "none"
            self._finished = time.monotonic()
        self.gallery.add(result)
        self.operations.set_requests(self.earlier_requests())
        return result

    def earlier_requests(self) -> list[dict]:
        """This image's recorded edit requests, oldest first."""
        return [r for r in self.session.edit_requests() if r.get("image") == self.entry.name]
