"""Edit operations as records: what one change of an image asks for, as JSON dicts and back.

::

    {"kind": "recon"}
    {"kind": "text", "item": 1, "prompt": "a red *"}
    {"kind": "image", "item": 1, "source_image": 1, "source_item": 2, "template": None, "source_session": None}
    {"kind": "move", "item": 1, "dx": 4, "dy": 0, "scale": 1.0}            # or "mask": a boolean array
    {"kind": "remove", "item": 3}
    {"kind": "add", "name": "hat", "prompt": "a red hat", "box": [x0, y0, x1, y1]}   # or "mask" / "mask_file"
    {"kind": "image", "item": 1, "source_item_file": "cup.safetensors"}   # a bank item (dedit_nb.bank)
    {"kind": "add", "name": "cup", "source_item_file": "cup.safetensors", "box": [x0, y0, x1, y1]}
    {"kind": "reshape", "item": 2, "mask_file": "hat.png"}                 # or "mask" / "box"

Items are named by index or name (``Item.name``). Each kind's fields, defaults and ranges are its schema,
:data:`parameters.OPERATIONS`; :func:`operation_from_dict` checks a dict against it. :mod:`dedit_nb.plans`
turns a list of operations into one plan for one sampling pass.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .parameters import EDIT_KINDS, MASK_HELP, OPERATIONS, ParameterError


@dataclass(eq=False)
class Operation:
    """One edit operation; its fields are those of ``OPERATIONS[kind]``."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """The operation as a JSON-ready dict: a mask array becomes its fingerprint (``{"sha256", "shape"}``;
        :meth:`EditResult.save <dedit_nb.edits.EditResult.save>` writes the array beside the manifest), a
        session its folder."""
        out = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "source_item_file" and value is None:
                continue        # only a bank source is recorded: other requests read as they always did
            if isinstance(value, np.ndarray):
                value = mask_fingerprint(value)
            elif f.name == "source_session" and value is not None and not isinstance(value, str):
                value = str(value.folder)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(eq=False)
class ReconOp(Operation):
    kind: ClassVar[str] = "recon"


@dataclass(eq=False)
class TextOp(Operation):
    kind: ClassVar[str] = "text"
    item: int | str = None
    prompt: str = ""


@dataclass(eq=False)
class ImageOp(Operation):
    kind: ClassVar[str] = "image"
    item: int | str = None
    source_image: int | str = 0
    source_item: int | str = None
    template: str | None = None
    source_session: Any = None          # a session folder, or a Session
    source_item_file: str | None = None  # a bank file, or a bank item of the session, instead of source_item


@dataclass(eq=False)
class MoveOp(Operation):
    kind: ClassVar[str] = "move"
    item: int | str = None
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    mask: np.ndarray | None = None
    mask_file: str | None = None


@dataclass(eq=False)
class RemoveOp(Operation):
    kind: ClassVar[str] = "remove"
    item: int | str = None


@dataclass(eq=False)
class AddOp(Operation):
    kind: ClassVar[str] = "add"
    name: str = "new item"
    prompt: str = ""
    mask: np.ndarray | None = None
    box: Sequence[float] | None = None
    mask_file: str | None = None
    source_item_file: str | None = None  # a bank item drawn in the mask (its prompt, or ``prompt`` as template)


@dataclass(eq=False)
class ReshapeOp(Operation):
    kind: ClassVar[str] = "reshape"
    item: int | str = None
    mask: np.ndarray | None = None
    box: Sequence[float] | None = None
    mask_file: str | None = None


OPERATION_TYPES: dict[str, type[Operation]] = {
    cls.kind: cls for cls in (ReconOp, TextOp, ImageOp, MoveOp, RemoveOp, AddOp, ReshapeOp)}
assert all([f.name for f in fields(OPERATION_TYPES[k])] == OPERATIONS[k].names for k in EDIT_KINDS)
PIXEL_FIELDS = ("mask", "box", "mask_file")


def operation_from_dict(data: Mapping, base_dir: str | Path | None = None) -> Operation:
    """An operation from its dict, checked against its schema (:data:`parameters.OPERATIONS`): an unknown
    kind or field, a value of the wrong type, a missing required field, or several ways of giving pixels
    fail with a :class:`ParameterError` naming it. A relative ``mask_file`` is read from ``base_dir`` (a
    saved edit's folder) when given."""
    if isinstance(data, Operation):     # made in Python (Editor.text...): checked the same way
        values = {f.name: getattr(data, f.name) for f in fields(data)}
        if values.get("source_session") is not None and not isinstance(values["source_session"], str):
            values["source_session"] = str(values["source_session"].folder)      # a Session
        check_operation(data.kind, values)
        return data
    if not isinstance(data, Mapping):
        raise ParameterError("edits", f"an operation is a dict such as {{'kind': 'move', 'item': 1, 'dx': 4}}, "
                                      f"got {data!r}")
    values = dict(data)
    kind = values.pop("kind", None)
    check_operation(kind, values)
    if values.get("mask_file") is not None and base_dir is not None:
        values["mask_file"] = str(Path(base_dir) / values["mask_file"])
    return OPERATION_TYPES[kind](**values)


def check_operation(kind: str, values: Mapping) -> None:
    """Check an operation's fields against ``OPERATIONS[kind]``: names, types and ranges, the required ones,
    and its pixels given one way."""
    if kind not in OPERATIONS:
        raise ParameterError("kind", f"unknown edit {kind!r}; choose one of {EDIT_KINDS}")
    schema = OPERATIONS[kind]
    if isinstance(values.get("mask"), Mapping) and "sha256" in values["mask"]:
        raise ParameterError("mask", "is the fingerprint of a mask array that was not saved with the edit; replay the "
                                     "folder EditResult.save wrote (it holds the mask as a file)")
    schema.check(values)
    for name in schema.missing(values):
        raise ParameterError(name, f"the {kind} operation needs {name}: {schema[name].help}")
    given = [name for name in PIXEL_FIELDS if name in schema and values.get(name) is not None]
    if len(given) > 1 or (kind in ("add", "reshape") and not given):
        raise ParameterError("mask", f"the {kind} operation takes its pixels one way, got {given or 'none'}: "
                                     f"{MASK_HELP}")


def flat_operation(kind: str, **flat) -> dict:
    """One operation's dict from the flat parameters of a single edit (03_edit's, :func:`edits.run_edit`'s):
    the fields of ``kind`` that are given; ``prompt`` is also an image edit's ``template``."""
    if kind not in OPERATIONS:
        raise ParameterError("edit", f"unknown edit {kind!r}; choose one of {EDIT_KINDS}")
    flat["template"] = flat.get("prompt") or None
    if flat.get("source_session") is not None and not isinstance(flat["source_session"], (str, Path)):
        flat["source_session"] = str(flat["source_session"].folder)       # a Session
    return {"kind": kind, **{f.name: flat[f.name] for f in OPERATIONS[kind]
                             if flat.get(f.name) is not None and flat.get(f.name) != ""}}


def operations_from(edits: Sequence, base_dir: str | Path | None = None) -> list[Operation]:
    """A list of operations from dicts (or operations); an error names the operation's position."""
    if isinstance(edits, (Mapping, Operation)) or not edits:
        raise ParameterError("edits", f"a list of one or more operations such as [{{'kind': 'remove', 'item': 1}}], "
                                      f"got {edits!r}")
    ops = []
    for i, data in enumerate(edits):
        try:
            ops.append(operation_from_dict(data, base_dir))
        except ParameterError as exc:
            raise ParameterError(exc.name, f"operation {i}: {str(exc).split(': ', 1)[1]}") from exc
    return ops


def mask_fingerprint(mask: np.ndarray) -> dict:
    """What a request records of a mask array not (yet) saved as a file."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    return {"sha256": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(), "shape": list(mask.shape)}


def operation_pixels(op: Operation, shape: tuple[int, int]) -> np.ndarray | None:
    """The pixels an add, reshape or redrawn move gives its item, as a boolean map of ``shape`` (None for a
    move by dx/dy/scale)."""
    if getattr(op, "mask", None) is not None:
        mask = np.asarray(op.mask)
        where = "mask"
    elif getattr(op, "box", None) is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in op.box)
        if not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
            raise ParameterError("box", f"{list(op.box)} is not a box inside the {shape[1]}x{shape[0]} image: give "
                                        f"0 <= x0 < x1 <= {shape[1]} and 0 <= y0 < y1 <= {shape[0]}")
        mask = np.zeros(shape, bool)
        mask[y0:y1, x0:x1] = True
        return mask
    elif getattr(op, "mask_file", None) is not None:
        mask, where = read_mask_file(op.mask_file), "mask_file"
    else:
        return None
    if mask.shape != tuple(shape):
        raise ParameterError(where, f"is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} (WxH), the image "
                                    f"works at {shape[1]}x{shape[0]}: draw the mask at the working size")
    mask = mask.astype(bool)
    if not mask.any():
        raise ParameterError(where, "has no pixels set: draw the item's pixels")
    return mask


def read_mask_file(path: str | Path) -> np.ndarray:
    """A mask from a .npy file (a 2-D array, never unpickled) or an image (its non-zero pixels)."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError("mask_file", f"{path} is not a file: give a .png or .npy mask")
    if path.suffix.lower() == ".npy":
        try:
            mask = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ParameterError("mask_file", f"{path} is not a plain .npy array ({exc})") from exc
    else:
        from PIL import Image
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 127
    if mask.ndim != 2:
        raise ParameterError("mask_file", f"{path} holds a {mask.ndim}-D array; a mask is 2-D (H, W)")
    return mask


def mask_png(mask: np.ndarray) -> np.ndarray:
    """A mask as the image :func:`read_mask_file` reads back (0 or 255)."""
    return np.asarray(mask, bool).astype(np.uint8) * 255
