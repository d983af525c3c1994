"""Interactive edits: choose an item and an edit, type a prompt or drag items, press Generate."""
from __future__ import annotations

import ipywidgets as W

from dedit_nb.edits import EDIT_KINDS, Editor, run_edit

from .gallery import ResultGallery
from .mask_editor import MaskEditor
from .state import ItemState


class EditPanel(W.VBox):
    """Controls for one session image over a finetuned model; results collect in a gallery.

    The move edit uses the moves dragged in the editor's ``move`` tool (and its item-scale slider).
    """

    def __init__(self, model, session, image=0, display_width: int = 384):
        self.editor_backend = Editor(model, session)
        self.session, self.image = session, image
        entry = session.image(image)
        self.state = ItemState.from_session(session, image)
        self.canvas = MaskEditor(self.state, display_width=display_width)
        self.canvas.tool.value = "move"
        labels = [(f"{k}: {it.label}", k) for k, it in enumerate(entry.items)]
        self.kind = W.ToggleButtons(options=list(EDIT_KINDS), value="text", description="edit")
        self.item = W.Dropdown(options=labels, description="item")
        self.prompt = W.Text(placeholder="a red bag  /  a photo of * in gold", description="prompt")
        sources = [(f"{i}:{k}: {it.label}", (i, k))
                   for i, e in enumerate(session.images) for k, it in enumerate(e.items)]
        self.source = W.Dropdown(options=sources, description="source item")
        self.strength = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="strength")
        self.guidance = W.FloatSlider(value=5.0, min=1.0, max=12.0, step=0.5, description="guidance")
        self.steps = W.IntSlider(value=50, min=5, max=100, description="steps")
        self.edge = W.IntSlider(value=10, min=0, max=64, description="soft band")
        self.seed = W.IntText(value=0, description="seed")
        self.num_images = W.IntSlider(value=1, min=1, max=8, description="images")
        self.generate = W.Button(description="Generate", icon="magic", button_style="primary")
        self.messages = W.Output()
        self.gallery = ResultGallery(session)
        self.generate.on_click(lambda _: self.run())
        super().__init__([
            W.HBox([self.canvas, W.VBox([self.kind, self.item, self.prompt, self.source, self.strength,
                                         self.guidance, self.steps, self.edge, self.seed, self.num_images,
                                         self.generate])]),
            self.messages, self.gallery])

    def sampling(self) -> dict:
        return dict(steps=self.steps.value, guidance=self.guidance.value, strength=self.strength.value,
                    edge_thickness=self.edge.value, seed=self.seed.value, num_images=self.num_images.value)

    def run(self):
        ed, kind, item = self.editor_backend, self.kind.value, self.item.value
        with self.messages:
            self.messages.clear_output()
            try:
                if kind == "move":  # every item dragged in the editor moves at once
                    if not self.state.moves:
                        raise ValueError("drag an item with the move tool (or set its scale) first")
                    result = ed.move(self.image, dict(self.state.moves), **self.sampling())
                else:
                    source_image, source_item = self.source.value
                    result = run_edit(ed, kind, self.image, item, self.prompt.value or None,
                                      source_image=source_image, source_item=source_item, **self.sampling())
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                print(f"not generated: {exc}")
                return None
        self.gallery.add(result)
        return result
