"""Jupyter widgets for dedit_nb: a canvas mask editor, an item palette and a result gallery.

``ItemsEditor(session)`` puts the editor and palette side by side (the palette below when the page is
narrow) over one shared :class:`ItemState`, with a button that saves the items into the session. Its tools
are mask tools only: moving an item is 03's move edit. ``widgets`` depends on ``dedit_nb``, never the reverse.
"""
from __future__ import annotations

import html
import weakref

import ipywidgets as W

from dedit_nb.session import Session

from .edit_panel import EditPanel
from .gallery import ResultCard, ResultGallery
from .mask_editor import MASK_TOOLS, MaskEditor
from .palette import ItemPalette
from .state import ItemsChangedError, ItemState, disk_stroke


class ItemsEditor(W.VBox):
    """Mask editor + item palette for one session image, and "save items to session".

    Two editors of one session image (two cells, or a cell run twice) never overwrite each other silently: a
    save after the other editor saved is refused with *reload* (continue from the saved items) and *save
    over* (replace them knowingly), and the other editor's status stops saying "saved"."""

    _open: "weakref.WeakSet[ItemsEditor]" = weakref.WeakSet()

    def __init__(self, session, image=0, prompter=None, display_width: int = 640):
        self.session, self.image = session, image
        self.state = ItemState.from_session(session, image)
        self.mask_editor = MaskEditor(self.state, display_width=display_width, prompter=prompter, tools=MASK_TOOLS)
        self.palette = ItemPalette(self.state, session=session)
        self.save_button = W.Button(description="save items to session", icon="save", button_style="success",
                                    layout=W.Layout(width="auto"),
                                    tooltip="write the items into the session (02_finetune learns them)")
        self.reload_button = W.Button(description="reload", icon="refresh", layout=W.Layout(width="auto"),
                                      tooltip="start again from the items saved in the session (undoable)")
        self.save_over_button = W.Button(description="save over", icon="save", button_style="warning",
                                         layout=W.Layout(width="auto"),
                                         tooltip="replace the items saved in the session with these")
        self.message = W.HTML()
        self._message_version = -1
        self.save_button.on_click(lambda _: self.save())
        self.reload_button.on_click(lambda _: self.reload())
        self.save_over_button.on_click(lambda _: self.save(replace_newer=True))
        self.state.observe(self._changed, names="version")
        self.state.observe(lambda _: self._show_conflict_buttons(), names="stale")
        wrap = W.Layout(flex_flow="row wrap", align_items="flex-start")
        super().__init__([W.HBox([self.mask_editor, self.palette], layout=wrap),
                          W.HBox([self.save_button, self.reload_button, self.save_over_button, self.message],
                                 layout=W.Layout(flex_flow="row wrap", align_items="center"))])
        self._show_conflict_buttons()
        ItemsEditor._open.add(self)

    def _changed(self, change) -> None:
        if self.state.version != self._message_version:
            self.message.value = ""          # "saved" or an error answers one press; an edit clears it

    def _show_conflict_buttons(self) -> None:
        for button in (self.reload_button, self.save_over_button):
            button.layout.display = None if self.state.stale else "none"
        self.mask_editor.status.value = self.mask_editor.status_html()

    def say(self, text: str, error: bool = False) -> None:
        self.message.value = (f"<span class='dedit-error' style='color:#b00020'>⚠ {html.escape(text)}</span>"
                              if error else f"<span class='dedit-note'>{html.escape(text)}</span>")
        self._message_version = self.state.version

    def save(self, replace_newer: bool = False) -> bool:
        """Save the items into the session; False (and the reason shown) when they were not saved."""
        try:
            self.state.save_to_session(self.session, self.image, replace_newer=replace_newer)
        except ItemsChangedError as exc:
            self.state.stale = True
            self.say(f"not saved: {exc}", error=True)
            return False
        except Exception as exc:  # noqa: BLE001 - SessionError, OSError, PartitionError...: shown, not raised
            self.say(f"not saved: {exc}", error=True)
            return False
        self.say(f"saved {self.state.num_items} items")
        for other in list(ItemsEditor._open):      # the other editors of this image no longer show "saved"
            if other is not self and other.image == self.image and other.session.folder == self.session.folder:
                other.state.stale = not other.state.is_saved_base(self.session, self.image)
        return True

    def reload(self) -> bool:
        """Continue from the items saved in the session folder (the edits made here stay undoable)."""
        try:
            fresh = Session.open(self.session.folder)      # what is on disk, whoever saved it
            entry = fresh.image(self.image)
            self.state.load(entry.labels, [i.name for i in entry.items], [i.template for i in entry.items])
        except Exception as exc:  # noqa: BLE001 - a deleted or broken session: shown, nothing changes
            self.say(str(exc), error=True)
            return False
        self.session = fresh
        self.say("reloaded the session's items (undo brings back the ones you had)")
        return True


__all__ = ["EditPanel", "ItemState", "ItemsChangedError", "MaskEditor", "ItemPalette", "ResultGallery", "ResultCard", "ItemsEditor",
           "disk_stroke"]
