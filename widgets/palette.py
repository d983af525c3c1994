"""The item palette: one row per item (swatch, how it looks in the photo, name, prompt template, area,
visibility), with add, merge, split and delete. It edits the same :class:`ItemState` as the mask editor, so
both stay in sync. The swatch is the item's colour on the canvas, exactly (``dedit_nb.display``); the photo
thumbnail is what the item's name describes ("red, centre" names the photo's colour, not the swatch's)."""
from __future__ import annotations

import html

import ipywidgets as W

from dedit_nb.display import item_colour, item_thumbnails, text_colour_on
from dedit_nb.session import png_bytes

from .state import ItemState

COLUMNS = (  # (header, width, tooltip)
    ("", "28px", "tick items to merge them"),
    ("item", "46px", "the item's colour on the canvas; click to select it"),
    ("photo", "40px", "the item as it looks in the photo (what a name like 'red, centre' describes)"),
    ("name", "130px", "the item's name (used in edits and manifests)"),
    ("prompt template", "130px", "text around the item's learned tokens: * stands for the item, "
                                 "e.g. 'a photo of *'; plain * uses the tokens alone"),
    ("area", "56px", "share of the image"),
    ("show", "50px", "show the item's colour on the canvas"),
)

THUMB_SIZE = 28
TEXT_COLUMNS = {"name", "prompt template"}   # these give way on a narrow page; the other columns never shrink


def _cell(header: str, width: str) -> W.Layout:
    """One column's cell layout, the same in the header and every row so that they line up."""
    if header in TEXT_COLUMNS:
        return W.Layout(flex=f"1 1 {width}", width="auto", min_width="90px")
    return W.Layout(width=width, flex="0 0 auto")


def _header() -> W.HBox:
    cells = [W.HTML(f"<b title='{html.escape(tip)}' style='font-size:12px'>{html.escape(text)}</b>",
                    layout=_cell(text, width)) for text, width, tip in COLUMNS]
    return W.HBox(cells, layout=W.Layout(border_bottom="1px solid #ccc"))


class ItemPalette(W.VBox):
    """``session`` (optional) adds "import item…": a bank file (an item learned in another session,
    ``dedit_nb.bank``) joins the session's bank items, for image edits, without training."""

    def __init__(self, state: ItemState, session=None, **kwargs):
        self.state, self.session = state, session
        self.rows = W.VBox()
        auto = lambda: W.Layout(width="auto", flex="0 0 auto")  # noqa: E731 - a Layout each: hiding one hides one
        self.add_button = W.Button(description="add item", icon="plus", layout=auto(),
                                   tooltip="a new empty item, selected: paint its pixels")
        self.merge_button = W.Button(description="merge ticked", icon="compress", layout=auto(),
                                     tooltip="merge the ticked items into the first ticked one")
        self.split_button = W.Button(description="split selected", icon="scissors", layout=auto(),
                                     tooltip="split the selected item into its connected parts")
        self.delete_button = W.Button(description="delete selected", icon="trash", button_style="danger",
                                      layout=auto(), tooltip="delete the selected item; its pixels go to its "
                                                           "nearest neighbours")
        self.message = W.HTML()
        self._message_version = -1
        self.add_button.on_click(lambda _: self._guard(self.state.add_item))
        self.merge_button.on_click(lambda _: self._guard(self._merge))
        self.split_button.on_click(lambda _: self._guard(lambda: self._split(self.state.selected)))
        self.delete_button.on_click(lambda _: self._guard(lambda: self.state.delete(self.state.selected)))
        self._checks: list[W.Checkbox] = []
        state.observe(lambda _: self.refresh(), names=["version", "selected"])
        self.bank_path = W.Text(placeholder="path/to/item.safetensors", layout=W.Layout(width="220px"),
                                description_allow_html=False)
        self.import_button = W.Button(description="import item…", icon="download", layout=auto(),
                                      tooltip="add a bank item (exported from another session) to this session's "
                                              "bank items, for image edits: no training")
        self.import_button.on_click(lambda _: self.import_item(self.bank_path.value))
        buttons = W.HBox([self.add_button, self.merge_button, self.split_button, self.delete_button]
                         + ([self.bank_path, self.import_button] if session is not None else []),
                         layout=W.Layout(flex_flow="row wrap"))
        kwargs.setdefault("layout", W.Layout(max_width="100%", min_width="0"))
        super().__init__([_header(), self.rows, buttons, self.message], **kwargs)
        self.refresh()

    def say(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#333"
        self.message.value = (f"<span class='{'dedit-error' if error else 'dedit-note'}' style='color:{colour}'>"
                              f"{'⚠ ' if error else ''}{html.escape(str(text))}</span>")
        self._message_version = self.state.version

    def import_item(self, path: str) -> str | None:
        """Import a bank file into the session's bank items; says what happened (the name it got, or why not)."""
        from dedit_nb.bank import BankFileError
        from dedit_nb.session import SessionError
        if not path.strip():
            self.say("give the path of a bank file (.safetensors) to import", error=True)
            return None
        try:
            name = self.session.import_item(path.strip())
        except (BankFileError, SessionError, OSError) as exc:
            self.say(str(exc), error=True)
            return None
        self.say(f"imported bank item {name!r}: use it as an image edit's source (source_item_file)")
        return name

    def _guard(self, action) -> None:
        try:
            action()
        except ValueError as exc:
            self.say(str(exc), error=True)

    def _merge(self) -> None:
        checked = self.checked()
        self.state.merge(checked)
        for check in self._checks:          # the ticks named items that no longer exist
            check.value = False

    def _split(self, item: int) -> None:
        if not self.state.split(item):
            self.say(f"{self.state.names[item]!r} is one connected piece: nothing to split")

    def checked(self) -> list[int]:
        return [k for k, c in enumerate(self._checks) if c.value]

    def refresh(self) -> None:
        """Rebuild the rows from the state (cheap: one row of small widgets per item)."""
        if self.state.version != self._message_version:
            self.message.value = ""
        areas = self.state.areas()
        total = max(int(areas.sum()), 1)
        old_checked = set(self.checked()) if len(self._checks) == self.state.num_items else set()
        rows, self._checks = [], []
        columns = [(header, width) for header, width, _ in COLUMNS]
        thumbs = item_thumbnails(self.state.image, self.state.labels, self.state.num_items, size=THUMB_SIZE)
        for k, name in enumerate(self.state.names):
            rgb = item_colour(k)
            selected = k == self.state.selected
            swatch = W.Button(description=str(k), layout=_cell(*columns[1]),
                              style={"button_color": "rgb({},{},{})".format(*rgb), "text_color": text_colour_on(rgb)},
                              tooltip=f"select item {k}")
            swatch.layout.border = "2px solid #2196f3" if selected else "2px solid transparent"
            swatch.add_class("dedit-swatch")
            swatch.on_click(lambda _, k=k: setattr(self.state, "selected", k))
            photo = W.Image(value=png_bytes(thumbs[k]), format="png",
                            layout=_cell(*columns[2]))
            photo.layout.height, photo.layout.object_fit = f"{THUMB_SIZE}px", "contain"
            photo.add_class("dedit-item-photo")
            label = W.Text(value=name, continuous_update=False, layout=_cell(*columns[3]))
            label.add_class("dedit-item-name")
            label.observe(lambda ch, k=k: self.state.rename(k, ch["new"]), names="value")
            template = W.Text(value=self.state.templates[k], continuous_update=False, placeholder="a photo of *",
                              layout=_cell(*columns[4]))
            template.observe(lambda ch, k=k: self.state.set_template(k, ch["new"]), names="value")
            area = W.Label(f"{areas[k] / total:.1%}", layout=_cell(*columns[5]))
            visible = W.Checkbox(value=self.state.visible[k], indent=False, layout=_cell(*columns[6]))
            visible.observe(lambda ch, k=k: self.state.set_visible(k, ch["new"]), names="value")
            check = W.Checkbox(value=k in old_checked, indent=False, layout=_cell(*columns[0]))
            self._checks.append(check)
            row = W.HBox([check, swatch, photo, label, template, area, visible])
            if selected:
                row.layout.border = "1px solid #2196f3"
            rows.append(row)
        self.rows.children = rows
