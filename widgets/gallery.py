"""A gallery of edit results in a grid of cards: before/after with a split slider, the hard/soft/active
regions with their legend, the manifest, and saving chosen results into the session."""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import ipywidgets as W
import numpy as np

from dedit_nb.display import edit_summary, region_legend_html, region_picture, tidy_numbers
from dedit_nb.quality import quality_summary
from dedit_nb.session import SESSION_FILE, SessionError, png_bytes

CARD_WIDTH = 320


def before_after(before: np.ndarray, after: np.ndarray, split: float) -> np.ndarray:
    """The original left of ``split`` (0..1 of the width), the result right of it, with a white divider."""
    out = after.copy()
    col = int(round(split * before.shape[1]))
    out[:, :col] = before[:, :col]
    if 0 < col < before.shape[1]:
        out[:, col] = 255
    return out


def upscale(image: np.ndarray, width: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor, so small images stay crisp when shown wide."""
    factor = max(1, int(width // image.shape[1]))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


class ResultCard(W.VBox):
    def __init__(self, result, width: int = CARD_WIDTH):
        self.result = result
        self.choice = W.Dropdown(options=list(range(len(result.images))), value=0, description="image",
                                 layout=W.Layout(width="130px"), style={"description_width": "initial"})
        # 0: the whole result; slide right to uncover the original from the left (each end names what it shows)
        self.split = W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="after ◀▶ before",
                                   readout=False, style={"description_width": "initial"},
                                   layout=W.Layout(width="180px"))
        self.picture = W.Image(format="png", layout=W.Layout(width=f"{width}px"))
        self.regions = W.Image(value=png_bytes(upscale(region_picture(result.regions), width // 2)), format="png",
                               layout=W.Layout(width=f"{width // 2}px"))
        self.selected = W.Checkbox(value=False, description="save this result", indent=False)
        manifest = tidy_numbers({k: v for k, v in result.manifest.items() if k != "prompts"})
        details = W.HTML(f"<pre style='font-size:10px;max-height:160px;overflow:auto;white-space:pre-wrap'>"
                         f"{html.escape(json.dumps(manifest, indent=1, ensure_ascii=False))}</pre>")
        self.choice.observe(lambda _: self.draw(), names="value")
        self.split.observe(lambda _: self.draw(), names="value")
        summary = edit_summary(result.kind, result.manifest.get("params") or {})
        self.title = W.HTML(f"<div class='dedit-card-title' title='{html.escape(summary)}' style='font-size:12px;"
                            f"line-height:1.3;max-width:{width}px;overflow-wrap:anywhere'>"
                            f"<b>{html.escape(summary.split(' · ', 1)[0])}</b>"
                            + (f" · {html.escape(summary.split(' · ', 1)[1])}" if " · " in summary else "")
                            + "</div>")
        legend = W.HTML(region_legend_html())
        super().__init__([self.title, self.picture, W.HBox([self.choice, self.split]),
                          W.HBox([self.regions, legend]), W.Accordion([details], titles=("manifest",)),
                          self.selected], layout=W.Layout(border="1px solid #ddd", padding="4px"))
        self.add_class("dedit-card")
        self.quality = W.HTML()          # the chosen image's quality record (manifest "quality"), drawn with it
        self.children += (self.quality,)
        self.width = width
        self.draw()

    def draw(self) -> None:
        after = self.result.images[self.choice.value]
        picture = before_after(self.result.original, after, self.split.value)
        self.picture.value = png_bytes(upscale(picture, self.width))
        records = self.result.manifest.get("quality") or []
        self.quality.value = quality_table(records[self.choice.value] if self.choice.value < len(records) else None)


def quality_table(record) -> str:
    """A small HTML table of a quality record's main figures (every text escaped); empty without one."""
    summary = quality_summary(record)
    if not summary:
        return ""

    def cells(tag, texts):
        return "".join(f"<{tag} style='padding:0 4px'>{html.escape(t)}</{tag}>" for t in texts)
    return (f"<table class='dedit-card-quality' style='font-size:10px;border-collapse:collapse'>"
            f"<tr>{cells('th', summary)}</tr><tr>{cells('td', summary.values())}</tr></table>")


class ResultGallery(W.VBox):
    """Collect results with :meth:`add`; tick some and press save to write them under the session."""

    def __init__(self, session=None, **kwargs):
        self.session = session
        self.cards: list[ResultCard] = []
        self.box = W.GridBox(layout=W.Layout(grid_template_columns=f"repeat(auto-fill, minmax({CARD_WIDTH + 12}px, "
                                                                    f"1fr))", grid_gap="8px", width="100%"))
        self.save_button = W.Button(description="save selected into session", icon="save",
                                    layout=W.Layout(width="auto"),
                                    tooltip="write the ticked results under the session's results/ folder")
        self.message = W.HTML()
        self.save_button.on_click(lambda _: self.save_selected())
        super().__init__([self.box, W.HBox([self.save_button, self.message])], **kwargs)

    def add(self, result) -> ResultCard:
        card = ResultCard(result)
        self.cards.append(card)
        self.box.children = tuple(self.box.children) + (card,)
        return card

    def say(self, text: str, error: bool = False) -> None:
        self.message.value = (f"<span class='dedit-error' style='color:#b00020'>⚠ {html.escape(text)}</span>" if error
                              else f"<span class='dedit-note'>{html.escape(text)}</span>")

    def save_selected(self) -> list[Path]:
        """Write the ticked results under the session's results/ folder; a session that is gone or cannot be
        written is said in the panel (nothing raised out of the button, no folder made for a deleted one)."""
        if self.session is None:
            self.say("no session to save into", error=True)
            return []
        if not (self.session.folder / SESSION_FILE).is_file():
            self.say(f"not saved: {self.session.folder} no longer holds a session (deleted or moved?)", error=True)
            return []
        saved = []
        try:
            for card in self.cards:
                if card.selected.value:
                    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
                    folder = card.result.save(self.session.folder / "results" / f"{stamp}-{card.result.kind}")
                    self.session.record_edit({"kind": "saved-result", "of": card.result.kind, "folder": str(folder)})
                    card.selected.value = False
                    saved.append(folder)
        except (SessionError, OSError, ValueError) as exc:
            self.say(f"not saved{f' (after {len(saved)} saved)' if saved else ''}: {exc}", error=True)
            return saved
        if saved:
            self.say(f"saved {len(saved)} result(s)")
        else:
            self.say("tick 'save this result' on a card first")
        return saved
