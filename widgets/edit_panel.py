"""Interactive edits: choose an item and an edit, type a prompt or drag items, press Generate."""
from __future__ import annotations

import html
import time

import ipywidgets as W
import numpy as np

from dedit_nb.display import edit_defaults, tidy_number
from dedit_nb.edits import Editor, run_edit
from dedit_nb.sampler import SCHEDULERS
from dedit_nb.session import png_bytes

from .gallery import ResultGallery, upscale
from .mask_editor import MaskEditor
from .state import ItemState

# which controls each edit uses (the rest are hidden)
EDIT_CONTROLS = {
    "recon": (),
    "text": ("item", "prompt"),
    "image": ("item", "source", "prompt"),
    "move": ("moves",),
    "remove": ("item",),
}
EDIT_TIPS = {
    "recon": "regenerate the image from its item prompts (checks the finetune)",
    "text": "replace the item's prompt ('a red bag'), or refine it ('a photo of * in gold', * = the item)",
    "image": "put an item learned from another image in the item's place",
    "move": "move / resize items: drag them in the canvas, set 'item scale'",
    "remove": "delete the item; its pixels go to its neighbours and are regenerated",
}
# A click that reaches the kernel this soon after an edit finished was queued while it ran (the kernel takes
# the next message at once): the second click of a double-click, not a request for another edit. Anyone
# asking for another edit has first seen this one end, which takes longer.
QUEUED_CLICK_S = 0.1


class EditPanel(W.VBox):
    """Controls for one session image over a finetuned model; results collect in a gallery.

    The item dropdown and the canvas share one selection (the :class:`ItemState`'s ``selected``). The move
    edit uses the moves dragged in the canvas (and its item-scale slider). Defaults are the model profile's
    (``dedit_nb.display.edit_defaults``), as 03_edit's parameters cell resolves them; ``edit``, ``item`` and
    ``prompt`` start the panel where the parameters cell left off.
    """

    def __init__(self, model, session, image=0, display_width: int = 384, edit: str = "text", item=None,
                 prompt: str = ""):
        self.editor_backend = Editor(model, session)
        self.session, self.image = session, image
        entry = session.image(image)
        self.state = ItemState.from_session(session, image)
        # nothing to save here (moves feed the move edit, not the items): no saved marker, no 'apply moves'
        self.canvas = MaskEditor(self.state, display_width=display_width, tools=("move",), save_marker=False)
        self.canvas.apply_moves_button.layout.display = "none"
        wide = {"description_width": "initial"}
        self.kind = W.ToggleButtons(options=list(EDIT_CONTROLS), value=edit, description="edit",
                                    tooltips=[EDIT_TIPS[k] for k in EDIT_CONTROLS], style={"button_width": "70px"})
        self.item = W.Dropdown(options=[(f"{k}: {it.name}", k) for k, it in enumerate(entry.items)],
                               description="item")
        if item is not None and item != "":
            self.item.value = entry.item_index(item)
        self.state.selected = self.item.value
        W.link((self.item, "value"), (self.state, "selected"))       # one selection: dropdown == canvas
        self.prompt = W.Text(value=prompt or "", placeholder="a red bag  /  a photo of * in gold",
                             description="prompt")
        sources = [(f"{e.name} · {k}: {it.name}", (i, k))
                   for i, e in enumerate(session.images) for k, it in enumerate(e.items)]
        self.source = W.Dropdown(options=sources, description="source item", style=wide)
        self.moves_hint = W.HTML("<i>drag items in the canvas (move tool); 'item scale' resizes the selected "
                                 "one</i>")
        d = edit_defaults(model)
        size = max(entry.labels.shape)
        self.strength = W.FloatSlider(value=d["strength"], min=0.0, max=1.0, step=0.05, description="strength",
                                      tooltip="share of steps during which the soft band is held to the original")
        self.guidance = W.FloatSlider(value=d["guidance"], min=1.0, max=12.0, step=0.5, description="guidance")
        self.steps = W.IntSlider(value=d["steps"], min=5, max=100, description="steps")
        self.edge = W.IntSlider(value=d["edge_thickness"], min=0, max=max(8, size // 4, d["edge_thickness"]), description="soft band",
                                tooltip="width in pixels of the band around the edit that is blended")
        self.seed = W.IntText(value=d["seed"], description="seed")
        self.num_images = W.IntSlider(value=d["num_images"], min=1, max=8, description="images")
        self.scheduler = W.Dropdown(options=list(SCHEDULERS), value=d["scheduler"], description="sampler",
                                    tooltip="the diffusers scheduler that samples (ddim: deterministic; "
                                            "dpm++ / unipc: good in fewer steps; *-ancestral, ddpm: add noise)")
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
        self.controls = {"item": self.item, "prompt": self.prompt, "source": self.source, "moves": self.moves_hint}
        self.blending = (self.strength, self.edge)                   # no blending in a recon: hidden there
        for control in (self.kind, self.item, self.prompt, self.source, self.strength, self.guidance, self.steps,
                        self.scheduler, self.edge, self.seed, self.num_images):
            control.observe(lambda _: setattr(self.error, "value", ""), names="value")   # an error answers one try
        self.state.observe(lambda _: setattr(self.error, "value", ""), names="version")
        column = W.VBox([self.kind, self.item, self.prompt, self.source, self.moves_hint, self.strength,
                         self.guidance, self.steps, self.scheduler, self.edge, self.seed, self.num_images,
                         self.generate, self.progress, self.preview], layout=W.Layout(max_width="100%"))
        super().__init__([W.HBox([self.canvas, column], layout=W.Layout(flex_flow="row wrap")),
                          self.error, self.gallery])
        self._kind_changed()

    def _kind_changed(self) -> None:
        used = EDIT_CONTROLS[self.kind.value]
        for name, control in self.controls.items():
            control.layout.display = None if name in used else "none"
        for row in (self.canvas.rows["move"], self.canvas.coords_row):      # item scale, moves by dx,dy
            row.layout.display = None if "moves" in used else "none"
        for control in self.blending:
            control.layout.display = "none" if self.kind.value == "recon" else None
        self.canvas.show_moves = "moves" in used                             # pending moves only for a move
        self.canvas.render()
        self.prompt.description = "template" if self.kind.value == "image" else "prompt"
        self.prompt.placeholder = ("optional: a photo of * in gold" if self.kind.value == "image"
                                   else "a red bag  /  a photo of * in gold")

    def sampling(self) -> dict:
        # sliders step in binary fractions of 0.05: 5.000000000000001 would reach the manifest
        return dict(steps=self.steps.value, guidance=tidy_number(self.guidance.value),
                    strength=tidy_number(self.strength.value), edge_thickness=self.edge.value,
                    seed=self.seed.value, num_images=self.num_images.value, scheduler=self.scheduler.value)

    def show_error(self, text: str) -> None:
        self.error.value = (f"<div class='dedit-error' style='color:#b00020;background:#fdecea;border-left:4px "
                            f"solid #b00020;padding:4px 8px'>⚠ not generated: {html.escape(str(text))}</div>")

    def show_progress(self, step: int, total: int, image: np.ndarray | None = None) -> None:
        """Progress of the running edit, with a preview picture when one is given (the sampler's step hook)."""
        self.progress.layout.display = None
        self.progress.max, self.progress.value = max(int(total), 1), int(step)
        if image is not None:
            self.preview.value = png_bytes(np.asarray(image, np.uint8))
            self.preview.layout.display = None

    def show_step(self, step) -> None:
        """The sampler's ``callback_on_step_end``: the progress bar and the first image's current estimate."""
        self.show_progress(step.step + 1, step.num_steps, upscale(step.preview()[0], self.preview_width))

    def _clicked(self, _) -> None:
        if time.monotonic() - self._finished >= QUEUED_CLICK_S:
            self.run()

    def run(self):
        ed, kind, item = self.editor_backend, self.kind.value, self.item.value
        self.error.value = ""
        self.generate.disabled, self.generate.description = True, "running…"
        self.show_progress(0, self.steps.value)
        try:
            if kind == "move":  # every item dragged in the editor moves at once
                if not self.state.moves:
                    raise ValueError("drag an item with the move tool (or set its scale) first")
                result = ed.move(self.image, dict(self.state.moves), callback_on_step_end=self.show_step, **self.sampling())
            else:
                source_image, source_item = self.source.value
                result = run_edit(ed, kind, self.image, item, self.prompt.value or None,
                                  source_image=source_image, source_item=source_item,
                                  callback_on_step_end=self.show_step, **self.sampling())
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            self.show_error(exc)
            return None
        finally:
            self.generate.disabled, self.generate.description = False, "Generate"
            self.progress.layout.display = self.preview.layout.display = "none"
            self._finished = time.monotonic()
        self.gallery.add(result)
        return result
