"""The edit panel's list of operations: collected one by one, then sampled together in one pass."""
from __future__ import annotations

from typing import Callable, Sequence

import ipywidgets as W
import numpy as np

from dedit_nb.operations import operations_from


def describe(operation: dict, item_names: Sequence[str] = ()) -> str:
    """One line for an operation dict: its kind and the values it sets (a mask as its pixel count, an item
    index with its name)."""
    parts = []
    for key, value in operation.items():
        if key == "kind" or value is None:
            continue
        if isinstance(value, np.ndarray):
            value = f"{int(np.count_nonzero(value))} px"
        elif key in ("item",) and isinstance(value, int) and 0 <= value < len(item_names):
            value = f"{value} ({item_names[value]})"
        elif isinstance(value, str):
            value = repr(value)
        parts.append(f"{key}={value}")
    return f"{operation['kind']}: " + ", ".join(parts) if parts else operation["kind"]


def describe_request(request: dict, item_names: Sequence[str] = ()) -> str:
    """One line for a recorded request (``Session.edit_requests()``): when, and its operations."""
    when = str(request.get("time") or "")[:19].replace("T", " ")
    return f"{when} · " + "; ".join(describe(op, item_names) for op in request.get("operations", []))


class OperationList(W.VBox):
    """Operations waiting for Generate. ``collect()`` returns the operations the panel's controls describe
    now (a move: one per dragged item); "add to list" appends them, "remove" drops the chosen one. ``requests``
    (the session's recorded requests for this image, oldest first) can be opened again into the list."""

    def __init__(self, collect: Callable[[], list[dict]], item_names: Sequence[str], on_error: Callable,
                 operations: Sequence[dict] | None = None, requests: Sequence[dict] = ()):
        self.operations: list[dict] = [dict(op) for op in operations or ()]
        self.collect, self.item_names, self.on_error = collect, list(item_names), on_error
        self.chooser = W.Select(options=[], rows=3, description="to do", layout=W.Layout(width="auto"))
        button = lambda text, icon, tip: W.Button(description=text, icon=icon, tooltip=tip,  # noqa: E731
                                                  layout=W.Layout(width="auto"))
        self.add_button = button("add to list", "plus", "add the edit set above to the list; Generate then runs "
                                                        "every listed operation in one sampling pass")
        self.remove_button = button("remove", "minus", "drop the chosen operation from the list")
        self.clear_button = button("clear", "times", "empty the list")
        self.add_button.on_click(lambda _: self.add())
        self.remove_button.on_click(lambda _: self.remove(self.chooser.index))
        self.clear_button.on_click(lambda _: self.clear())
        self.earlier = W.Dropdown(options=[], description="earlier", layout=W.Layout(width="auto"))
        self.open_button = button("open", "folder-open", "put the chosen earlier edit's operations in the list, "
                                                         "in place of what it holds")
        self.open_button.on_click(lambda _: self.reopen(self.earlier.value))
        super().__init__([W.HBox([self.add_button, self.remove_button, self.clear_button]), self.chooser,
                          W.HBox([self.earlier, self.open_button])])
        self.set_requests(requests)
        self._show()

    def set_requests(self, requests: Sequence[dict]) -> None:
        """The earlier requests that can be opened, newest first."""
        self.requests = list(requests)
        self.earlier.options = [(describe_request(r, self.item_names), k)
                                for k, r in reversed(list(enumerate(self.requests)))]
        self.earlier.layout.display = self.open_button.layout.display = None if self.requests else "none"

    def reopen(self, index: int | None) -> None:
        """The operations of earlier request ``index`` become the list; one whose drawn mask was not kept (the
        history holds only its fingerprint) is refused, naming how to replay it."""
        if index is None or not 0 <= index < len(self.requests):
            return
        operations = [dict(op) for op in self.requests[index].get("operations", [])]
        try:
            operations_from(operations)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            self.on_error(exc)
            return
        self.operations = operations
        self._show()

    def add(self) -> None:
        try:
            self.operations += self.collect()
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            self.on_error(exc)
        self._show()

    def remove(self, index: int | None) -> None:
        if index is not None and 0 <= index < len(self.operations):
            del self.operations[index]
        self._show()

    def clear(self) -> None:
        self.operations.clear()
        self._show()

    def _show(self) -> None:
        self.chooser.options = [(f"{k + 1}. {describe(op, self.item_names)}", k)
                                for k, op in enumerate(self.operations)]
        self.chooser.layout.display = None if self.operations else "none"
        self.remove_button.disabled = self.clear_button.disabled = not self.operations
