"""A gallery of edit results: before/after with a split slider, the hard/soft/active regions, the
manifest, and saving chosen results into the session."""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import ipywidgets as W
import numpy as np

from dedit_nb.session import png_bytes

REGION_COLOURS = np.array([(60, 60, 60), (240, 180, 40), (40, 200, 120)], np.uint8)  # hard, soft, active


def before_after(before: np.ndarray, after: np.ndarray, split: float) -> np.ndarray:
    """The original left of ``split`` (0..1 of the width), the result right of it, with a white divider."""
    out = after.copy()
    col = int(round(split * before.shape[1]))
    out[:, :col] = before[:, :col]
    if 0 < col < before.shape[1]:
        out[:, col] = 255
    return out


class ResultCard(W.VBox):
    def __init__(self, result, width: int = 320):
        self.result = result
        self.choice = W.Dropdown(options=list(range(len(result.images))), value=0, description="image",
                                 layout=W.Layout(width="150px"))
        self.split = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="before|after")
        self.picture = W.Image(format="png", layout=W.Layout(width=f"{width}px"))
        regions = REGION_COLOURS[result.regions.as_uint8()]
        self.regions = W.Image(value=png_bytes(regions), format="png", layout=W.Layout(width=f"{width // 2}px"))
        self.selected = W.Checkbox(value=False, description="save this result", indent=False)
        manifest = {k: v for k, v in result.manifest.items() if k != "prompts"}
        details = W.HTML(f"<pre style='font-size:10px;max-height:160px;overflow:auto'>"
                         f"{html.escape(json.dumps(manifest, indent=1))}</pre>")
        self.choice.observe(lambda _: self.draw(), names="value")
        self.split.observe(lambda _: self.draw(), names="value")
        title = W.HTML(f"<b>{result.kind}</b> · {html.escape(str(result.manifest.get('params', '')))[:120]}")
        super().__init__([title, W.HBox([self.picture, W.VBox([W.Label("hard / soft / active"), self.regions])]),
                          W.HBox([self.choice, self.split]), W.Accordion([details], titles=("manifest",)),
                          self.selected], layout=W.Layout(border="1px solid #ddd", padding="4px", margin="4px"))
        self.draw()

    def draw(self) -> None:
        after = self.result.images[self.choice.value]
        self.picture.value = png_bytes(before_after(self.result.original, after, self.split.value))


class ResultGallery(W.VBox):
    """Collect results with :meth:`add`; tick some and press save to write them under the session."""

    def __init__(self, session=None, **kwargs):
        self.session = session
        self.cards: list[ResultCard] = []
        self.box = W.VBox()
        self.save_button = W.Button(description="save selected into session", icon="save")
        self.message = W.HTML()
        self.save_button.on_click(lambda _: self.save_selected())
        super().__init__([self.box, W.HBox([self.save_button, self.message])], **kwargs)

    def add(self, result) -> ResultCard:
        card = ResultCard(result)
        self.cards.append(card)
        self.box.children = tuple(self.box.children) + (card,)
        return card

    def save_selected(self) -> list[Path]:
        if self.session is None:
            self.message.value = "no session to save into"
            return []
        saved = []
        for card in self.cards:
            if card.selected.value:
                stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
                folder = card.result.save(self.session.folder / "results" / f"{stamp}-{card.result.kind}")
                self.session.record_edit({"kind": "saved-result", "of": card.result.kind, "folder": str(folder)})
                card.selected.value = False
                saved.append(folder)
        self.message.value = f"saved {len(saved)} result(s)"
        return saved
