"""Keyboard shortcuts over a canvas that never take keys from a text box.

ipyevents focuses the canvas when the pointer enters it, so a prompt or label being typed while the pointer
rests on the canvas turned into tool changes. :class:`CanvasKeys` is a small anywidget instead: its page-side
code forwards a key to the kernel only while the pointer is over the canvas *and* no text input has focus,
so the focused input keeps its keys (and its focus) whatever the pointer does. It also reports Enter in a
text box, with the box's text, for boxes that apply on Enter.
"""
from __future__ import annotations

import anywidget
import traitlets

_ESM = r"""
const TYPING = new Set(["INPUT", "TEXTAREA", "SELECT"]);
const MODIFIERS = new Set(["Shift", "Control", "Alt", "Meta", "CapsLock"]);

function typing(node) {
  return !!node && (TYPING.has(node.tagName) || node.isContentEditable);
}

function render({ model, el }) {
  el.style.display = "none";
  const mark = () => "__dedit_" + model.get("canvas_class");   // one message per event, however many views
  const over = () => !!document.querySelector("." + model.get("canvas_class") + ":hover");
  const onKey = (event) => {
    if (event[mark()]) return;
    const submit = model.get("submit_class");
    if (event.type === "keydown" && event.key === "Enter" && submit && event.target.closest
        && event.target.closest("." + submit)) {
      event[mark()] = true;
      model.send({ type: "submit", value: event.target.value });
      return;
    }
    if (typing(document.activeElement) || !over() || MODIFIERS.has(event.key)) return;
    event[mark()] = true;
    event.preventDefault();
    event.stopPropagation();          // JupyterLab's command-mode keys (b, e, m...) never see it
    model.send({ type: event.type, key: event.key, shiftKey: event.shiftKey, ctrlKey: event.ctrlKey,
                 metaKey: event.metaKey });
  };
  document.addEventListener("keydown", onKey, true);
  document.addEventListener("keyup", onKey, true);
  return () => {
    document.removeEventListener("keydown", onKey, true);
    document.removeEventListener("keyup", onKey, true);
  };
}
export default { render };
"""


class CanvasKeys(anywidget.AnyWidget):
    """Forwards keydown/keyup over the element with CSS class ``canvas_class`` (when no text input has focus),
    and Enter in the text box with class ``submit_class``, to ``on_key(event)`` as ipyevents-style dicts:
    ``{"type": "keydown", "key": ..., "shiftKey": ..., "ctrlKey": ..., "metaKey": ...}`` or
    ``{"type": "submit", "value": text}``."""

    _esm = _ESM
    canvas_class = traitlets.Unicode("").tag(sync=True)
    submit_class = traitlets.Unicode("").tag(sync=True)

    def __init__(self, on_key, **kwargs):
        super().__init__(**kwargs)
        self.on_msg(lambda _, content, buffers: on_key(content))
