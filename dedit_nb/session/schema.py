"""Reading a session folder: session.json checked into typed records (every key and type ``Session`` relies
on, so a damaged file is named with its fix, not met as a TypeError), and the data files it names loaded."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from .. import masks as M
from .items import Item, ImageEntry, SessionError

FORMAT = 1
SESSION_FILE = "session.json"
DATA_FOLDERS = ("images", "items", "weights")

# --- reading and checking a session folder -----------------------------------------------------------
_FIX_JSON = "restore session.json from a backup, or make the session again (01_segment)"


def _check_session(folder: Path) -> tuple[dict, list[ImageEntry]]:
    """session.json, the images and label maps it names (loaded), and its weights files (headers), checked."""
    record = _read_session_json(folder)
    images = _load_images(folder, record.images)
    _check_weight_files(folder, record.document)
    return record.document, images


def _read_json(folder: Path) -> dict | None:
    """session.json as it is on disk (None when there is none), checked."""
    if not (folder / SESSION_FILE).exists():
        return None
    return _read_session_json(folder).document


def _read_session_json(folder: Path) -> SessionRecord:
    path = folder / SESSION_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessionError(f"{path} is not valid JSON ({exc}); {_FIX_JSON}") from exc
    return SessionRecord.from_json(data, path)


def _fail(path: Path, what: str, fix: str = _FIX_JSON):
    raise SessionError(f"{path}: {what}; {fix}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_relpath(path: Path, where: str, value) -> None:
    if not isinstance(value, str) or not value:
        _fail(path, f"{where} should be a file name, got {value!r}")
    parts = PurePosixPath(value).parts
    if PurePosixPath(value).is_absolute() or ".." in parts or len(parts) != 2 or parts[0] not in DATA_FOLDERS:
        _fail(path, f"{where} is {value!r}, not a file in one of the session's folders {DATA_FOLDERS}")


@dataclass
class ImageRecord:
    """An image as session.json lists it: its name, its files (relative to the session folder), its items and
    how the original became the working image."""

    name: str
    original: str
    working: str
    labels: str
    items: list[Item]
    fit: dict

    @classmethod
    def from_json(cls, entry, path: Path, where: str) -> "ImageRecord":
        """The record of ``entry`` (``where`` in the session.json at ``path``), or a :class:`SessionError` naming
        what is wrong."""
        if not isinstance(entry, dict):
            _fail(path, f"{where} should be an object, got {json.dumps(entry)[:60]}")
        if not isinstance(entry.get("name"), str):
            _fail(path, f"{where}.name should be a string")
        for key in ("original", "working", "labels"):
            _check_relpath(path, f"{where}.{key}", entry.get(key))
        items = entry.get("items")
        if not isinstance(items, list) or not items:
            _fail(path, f"{where}.items should be a non-empty list of items")
        for k, item in enumerate(items):
            if isinstance(item, dict) and "label" in item and "name" not in item:   # written before items had names
                item = items[k] = {("name" if key == "label" else key): value for key, value in item.items()}
            tokens = item.get("tokens", []) if isinstance(item, dict) else None
            ok = (isinstance(item, dict) and set(item) <= {"name", "tokens", "template"}
                  and isinstance(item.get("name"), str) and isinstance(item.get("template", ""), str)
                  and isinstance(tokens, list) and all(isinstance(t, str) for t in tokens))
            if not ok:
                _fail(path, f"{where}.items[{k}] should be {{name: str, tokens: [str], template: str}}, got "
                      f"{json.dumps(item)[:80]}")
        return cls(entry["name"], entry["original"], entry["working"], entry["labels"],
                   [Item(**it) for it in items], entry.get("fit", {}))


@dataclass
class SessionRecord:
    """session.json, checked: the document as it is (every key, since writers merge their changes into it) and
    the records of its images."""

    document: dict
    images: list[ImageRecord]

    @classmethod
    def from_json(cls, data, path: Path) -> "SessionRecord":
        """Every key and type ``Session`` relies on, checked, so a damaged session.json is named, not a
        TypeError."""
        if not isinstance(data, dict):
            _fail(path, f"holds a JSON {type(data).__name__}, not an object with the session's keys")
        fmt = data.get("format")
        if not _is_int(fmt):
            _fail(path, f'has "format": {json.dumps(fmt)} ({type(fmt).__name__}); this version reads '
                  f'"format": {FORMAT}, a number', f'write "format": {FORMAT} if the rest of the file is intact, '
                  f"or {_FIX_JSON}")
        if fmt != FORMAT:
            _fail(path, f"has format {fmt}; this version reads format {FORMAT}",
                  "open it with the dedit-workbench version that wrote it")
        expected = {"id": str, "resolution": int, "multiple": int, "images": list, "history": list}
        for key, kind in expected.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                _fail(path, f"{key!r} should be a {kind.__name__}, got {json.dumps(data.get(key))[:60]}")
        for key in ("model_id",):
            if data.get(key) is not None and not isinstance(data[key], str):
                _fail(path, f"{key!r} should be a string or null, got {json.dumps(data[key])[:60]}")
        if not data["images"]:
            _fail(path, "lists no images")
        images = [ImageRecord.from_json(entry, path, f"images[{i}]") for i, entry in enumerate(data["images"])]
        for key in ("weights", "pending"):
            if data.get(key) is not None:
                _check_weights_entry(data, key, path)
        bank = data.get("bank", [])
        if not isinstance(bank, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                 and isinstance(e.get("file"), str) for e in bank):
            _fail(path, "'bank' should be a list of objects with a 'name' and a 'file'")
        for i, entry in enumerate(bank):
            _check_relpath(path, f"bank[{i}].file", entry["file"])
        if (data.get("weights") is None) != (data.get("finetune") is None):
            _fail(path, "has learned weights without a finetune state, or a finetune state without weights",
                  "restore session.json from a backup, or finetune the session again (resume=False)")
        return cls(data, images)


def _check_weights_entry(data: dict, key: str, path: Path) -> None:
    info = data[key]
    fix = "restore session.json from a backup, or finetune the session again (finetune(..., resume=False))"
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        _fail(path, f"{key!r} should be an object with 'files'", fix)
    for kind, rel in info["files"].items():
        _check_relpath(path, f"{key}.files.{kind}", rel)
    state = info.get("finetune") if key == "pending" else data.get("finetune")
    if not isinstance(state, dict) or not _is_int(state.get("stage")) or not _is_int(state.get("step")):
        _fail(path, f"the finetune state of {key!r} should be an object with integer 'stage' and 'step'", fix)
    needed = ["tokens"] + (["unet"] if state["stage"] == 2 else [])
    missing = [k for k in needed if k not in info["files"]]
    if missing:
        _fail(path, f"{key}.files lists no {' or '.join(missing)} weights although the finetune reached stage "
              f"{state['stage']}; edits would run without them", fix)
    if info.get("mode") not in ("attn", "lora", "per_item"):
        _fail(path, f"{key}.mode should be 'attn', 'lora' or 'per_item', got {json.dumps(info.get('mode'))}", fix)


def _load_images(folder: Path, records: list[ImageRecord]) -> list[ImageEntry]:
    """The images of ``records`` with their working images and label maps read from ``folder``, checked."""
    images = []
    for entry in records:
        name = entry.name
        working_path, labels_path = folder / entry.working, folder / entry.labels
        fix = f"restore it from a backup, or make the session again from its original ({entry.original})"
        if not working_path.exists():
            raise SessionError(f"{working_path} (the working image of image {name!r}) is missing; {fix}")
        try:
            with Image.open(working_path) as im:
                working = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise SessionError(f"{working_path} (the working image of image {name!r}) is not a readable "
                               f"image ({exc}); {fix}") from exc
        if not labels_path.exists():
            raise SessionError(f"{labels_path} (the label map of image {name!r}) is missing; restore it from a "
                               "backup, or set the items again (01_segment with overwrite=True)")
        try:
            labels = np.load(labels_path, allow_pickle=False)
            if not isinstance(labels, np.ndarray):
                raise ValueError("it holds several arrays")
            labels = M.check_labels(labels, len(entry.items), shape=working.shape[:2])
        except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError for damaged files
            raise SessionError(f"{labels_path} (the label map of image {name!r}) is not a valid label map of "
                               f"{len(entry.items)} items ({exc}); restore it from a backup, or set the items "
                               "again (01_segment with overwrite=True)") from exc
        images.append(ImageEntry(name, entry.original, working, labels, entry.items, entry.working, entry.fit))
    return images


def _read_weights_file(path: Path, kind: str) -> dict:
    """The tensors of a learned weights file of ``kind``, checked: readable, and finite (NaN or infinite weights
    would make every edit come out flat)."""
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SessionError(f"{path} (the learned {kind} weights) is not a readable safetensors file "
                           f"({exc}); restore it from a backup, or finetune the session again "
                           "(resume=False)") from exc
    import torch
    broken = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if broken:
        raise SessionError(f"{path} (the learned {kind} weights) holds NaN or infinite values ({broken[0]}"
                           f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); edits would come out "
                           "flat: restore it from a backup, or finetune the session again (resume=False)")
    return tensors


def _check_weight_files(folder: Path, data: dict) -> None:
    """Every learned weights file exists and has a readable safetensors header."""
    from safetensors import safe_open
    for key in ("weights", "pending"):
        info = data.get(key)
        for kind, rel in ((info or {}).get("files") or {}).items():
            path = folder / rel
            fix = "restore it from a backup, or finetune the session again (finetune(..., resume=False))"
            if not path.exists():
                raise SessionError(f"{path} (the learned {kind} weights) is missing; {fix}")
            try:
                with safe_open(str(path), framework="numpy") as f:
                    list(f.keys())
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise SessionError(f"{path} (the learned {kind} weights) is not a readable safetensors file "
                                   f"({exc}); {fix}") from exc
