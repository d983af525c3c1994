"""The item palette: one row per item (swatch, label, prompt template, area, visibility), with add, merge,
split and delete. It edits the same :class:`ItemState` as the mask editor, so both stay in sync."""
from __future__ import annotations

import ipywidgets as W

from dedit_nb.segment.partition import item_colour

from .state import ItemState


class ItemPalette(W.VBox):
    def __init__(self, state: ItemState, **kwargs):
        self.state = state
        self.rows = W.VBox()
        self.add_button = W.Button(description="add item", icon="plus")
        self.merge_button = W.Button(description="merge checked", icon="compress")
        self.split_button = W.Button(description="split selected", icon="scissors")
        self.delete_button = W.Button(description="delete selected", icon="trash", button_style="danger")
        self.message = W.HTML()
        self.add_button.on_click(lambda _: self._guard(self.state.add_item))
        self.merge_button.on_click(lambda _: self._guard(lambda: self.state.merge(self.checked())))
        self.split_button.on_click(lambda _: self._guard(lambda: self.state.split(self.state.selected)))
        self.delete_button.on_click(lambda _: self._guard(lambda: self.state.delete(self.state.selected)))
        self._checks: list[W.Checkbox] = []
        state.observe(lambda _: self.refresh(), names=["version", "selected"])
        super().__init__([self.rows, W.HBox([self.add_button, self.merge_button, self.split_button,
                                             self.delete_button]), self.message], **kwargs)
        self.refresh()

    def _guard(self, action) -> None:
        try:
            action()
            self.message.value = ""
        except ValueError as exc:
            self.message.value = f"<span style='color:#b00'>{exc}</span>"

    def checked(self) -> list[int]:
        return [k for k, c in enumerate(self._checks) if c.value]

    def refresh(self) -> None:
        """Rebuild the rows from the state (cheap: one row of small widgets per item)."""
        areas = self.state.areas()
        total = max(int(areas.sum()), 1)
        old_checked = set(self.checked())
        rows, self._checks = [], []
        for k, name in enumerate(self.state.names):
            r, g, b = item_colour(k)
            selected = k == self.state.selected
            swatch = W.Button(description=str(k), layout=W.Layout(width="42px"),
                              style={"button_color": f"rgb({r},{g},{b})"}, tooltip="select this item",
                              button_style="" if not selected else "info")
            swatch.on_click(lambda _, k=k: setattr(self.state, "selected", k))
            label = W.Text(value=name, continuous_update=False, layout=W.Layout(width="160px"))
            label.observe(lambda ch, k=k: self.state.rename(k, ch["new"]), names="value")
            template = W.Text(value=self.state.templates[k], continuous_update=False, placeholder="prompt, * = item",
                              layout=W.Layout(width="160px"))
            template.observe(lambda ch, k=k: self.state.set_template(k, ch["new"]), names="value")
            area = W.Label(f"{areas[k] / total:.1%}", layout=W.Layout(width="52px"))
            visible = W.Checkbox(value=self.state.visible[k], description="show", indent=False,
                                 layout=W.Layout(width="60px"))
            visible.observe(lambda ch, k=k: self.state.set_visible(k, ch["new"]), names="value")
            check = W.Checkbox(value=k in old_checked, description="", indent=False, layout=W.Layout(width="28px"))
            self._checks.append(check)
            row = W.HBox([check, swatch, label, template, area, visible])
            if selected:
                row.layout.border = "1px solid #2196f3"
            rows.append(row)
        self.rows.children = rows
