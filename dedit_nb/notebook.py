"""What the notebooks call: parameter checks that fail early and name the parameter, and the headless
step of each notebook, so the notebooks stay thin and this logic is tested."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .edits import EDIT_KINDS, Editor, EditResult, run_edit
from .sampler import SamplingConfig
from .segment import METHODS
from .session import Session, SessionError


class ParameterError(ValueError):
    """A notebook parameter with a wrong name or value."""

    def __init__(self, name: str, message: str):
        super().__init__(f"parameter {name!r}: {message}")
        self.name = name


def segmenter_kwargs(segmenter: str, num_items: int = 6, checkpoint: str | None = None,
                     panoptic_model: str | None = None, detector: str | None = None, text: str = "") -> dict:
    """Keyword arguments of ``segment`` for a segmenter chosen by name, checked."""
    if segmenter not in METHODS:
        raise ParameterError("segmenter", f"{segmenter!r} is not one of {METHODS}")
    if segmenter == "offline":
        if int(num_items) < 1:
            raise ParameterError("num_items", f"must be >= 1, got {num_items}")
        return {"num_items": int(num_items)}
    if segmenter in ("sam", "text") and not checkpoint:
        raise ParameterError("checkpoint", f"segmenter {segmenter!r} needs a SAM .pth checkpoint path "
                                           "(sam_vit_b_01ec64.pth from the segment-anything README)")
    if segmenter == "sam":
        return {"checkpoint": checkpoint}
    if segmenter == "panoptic":
        return {"model": panoptic_model or "facebook/mask2former-swin-base-coco-panoptic"}
    if not text.strip():
        raise ParameterError("text", "segmenter 'text' needs phrases such as 'bag. table.'")
    return {"text": text, "checkpoint": checkpoint, "detector": detector or "IDEA-Research/grounding-dino-tiny"}


def check_edit_params(session: Session, edit: str, item=None, prompt: str = "", source_session: str | None = None,
                      source_item=None, image=0, source_image=0, **sampling) -> SamplingConfig:
    """Check an edit's parameters against the session before any model is loaded."""
    if edit not in EDIT_KINDS:
        raise ParameterError("edit", f"{edit!r} is not one of {EDIT_KINDS}")
    entry = session.image(image)
    if edit != "recon":
        if item is None or item == "":
            raise ParameterError("item", f"the {edit} edit needs an item; items: {[i.label for i in entry.items]}")
        try:
            entry.item_index(item)
        except Exception as exc:  # noqa: BLE001
            raise ParameterError("item", str(exc)) from exc
    if edit == "text" and not (prompt or "").strip():
        raise ParameterError("prompt", "the text edit needs a prompt, e.g. 'a red bag' or 'a photo of * in gold'")
    if edit == "image":
        if source_item is None or source_item == "":
            raise ParameterError("source_item", "the image edit needs the item to bring in")
        source = session
        if source_session:
            source = _open_session("source_session", source_session)
            try:
                session.check_joint(source)
            except SessionError as exc:
                raise ParameterError("source_session", str(exc)) from exc
        try:
            source.image(source_image).item_index(source_item)
        except Exception as exc:  # noqa: BLE001
            raise ParameterError("source_item", str(exc)) from exc
    try:
        return SamplingConfig(**sampling)
    except ValueError as exc:          # messages start with the field's name
        raise ParameterError(str(exc).split()[0], str(exc)) from exc
    except TypeError as exc:           # an unknown keyword: name it
        import re
        unknown = re.search(r"'(\w+)'", str(exc))
        raise ParameterError(unknown.group(1) if unknown else "sampling", "unknown sampling parameter") from exc


def headless_edit(model, session: Session, edit: str, output_dir: str | Path, item=None, prompt: str = "",
                  dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, source_session: str | None = None,
                  source_image=0, source_item=None, image=0, progress: bool = True, **sampling) -> EditResult:
    """One edit from flat parameters; writes images, regions and manifest.json into ``output_dir``."""
    check_edit_params(session, edit, item, prompt, source_session, source_item, image, source_image, **sampling)
    source = Session.open(source_session) if source_session else None
    editor = Editor(model, session, progress=progress)
    result = run_edit(editor, edit, image=image, item=item, prompt=prompt, dx=dx, dy=dy, scale=scale,
                      source_image=source_image, source_item=source_item,
                      source_session=source, **sampling)
    result.save(output_dir)
    return result


def open_sessions(paths: Sequence[str]) -> list[Session]:
    """The sessions of the ``extra_sessions`` parameter."""
    return [_open_session("extra_sessions", p) for p in paths or []]


def _open_session(parameter: str, path: str | Path) -> Session:
    try:
        return Session.open(path)
    except SessionError as exc:
        raise ParameterError(parameter, f"{exc} (01_segment makes one)") from exc
