"""Jupyter widgets for dedit_nb: a canvas mask editor, an item palette and a result gallery.

``ItemsEditor(session)`` puts the editor and palette side by side over one shared :class:`ItemState`, with
a button that saves the items into the session. ``widgets`` depends on ``dedit_nb``, never the reverse.
"""
from __future__ import annotations

import html

import ipywidgets as W

from .edit_panel import EditPanel
from .gallery import ResultCard, ResultGallery
from .mask_editor import MaskEditor
from .palette import ItemPalette
from .state import ItemState, disk_stroke


class ItemsEditor(W.VBox):
    """Mask editor + item palette for one session image, and "save items to session"."""

    def __init__(self, session, image=0, prompter=None, display_width: int = 640):
        self.session, self.image = session, image
        self.state = ItemState.from_session(session, image)
        self.editor = MaskEditor(self.state, display_width=display_width, prompter=prompter)
        self.palette = ItemPalette(self.state)
        self.save_button = W.Button(description="save items to session", icon="save", button_style="success",
                                    layout=W.Layout(width="auto"),
                                    tooltip="write the items into the session (02_finetune learns them)")
        self.message = W.HTML()
        self._message_version = -1
        self.save_button.on_click(lambda _: self.save())
        self.state.observe(self._changed, names="version")
        super().__init__([W.HBox([self.editor, self.palette]), W.HBox([self.save_button, self.message])])

    def _changed(self, change) -> None:
        if self.state.version != self._message_version:
            self.message.value = ""          # "saved" or an error answers one press; an edit clears it

    def save(self) -> bool:
        try:
            self.state.save_to_session(self.session, self.image)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the session is unchanged
            self.message.value = (f"<span class='dedit-error' style='color:#b00020'>⚠ not saved: "
                                  f"{html.escape(str(exc))}</span>")
            self._message_version = self.state.version
            return False
        self._message_version = self.state.version
        self.message.value = f"<span class='dedit-note'>saved {self.state.num_items} items</span>"
        return True


__all__ = ["EditPanel", "ItemState", "MaskEditor", "ItemPalette", "ResultGallery", "ResultCard", "ItemsEditor",
           "disk_stroke"]
