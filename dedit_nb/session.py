"""The session: one folder that carries an edit project through every notebook.

Layout::

    session.json              what everything is (format, images, items, model, weights, finetune, history)
    images/<i>-original-<hash>.<ext>  the user's file, byte for byte (never modified)
    images/<i>-working-<hash>.png     the image at the working size the model sees
    items/<i>-<hash>.npy       label map of image i (int32, one item index per pixel)
    weights/<kind>-<hash>.safetensors  learned item tokens, trained UNet parameters, optimizer state

Data files are named by their content hash and written before ``session.json`` (itself written atomically),
so a crash at any point leaves the previous session intact; files no longer referenced are deleted after.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import masks as M
from .images import fit_working_size, to_rgb_array

FORMAT = 1
SESSION_FILE = "session.json"
DEFAULT_TEMPLATE = "*"


class SessionError(RuntimeError):
    """A session folder or an operation on it that is not valid, with the fix."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as .npy bytes (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    """A uint8 image array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())[:12] or "item"


@dataclass
class Item:
    """One item of an image: a name, its learned-prompt tokens, and a prompt template (``*`` = tokens)."""

    label: str
    tokens: list[str] = field(default_factory=list)
    template: str = DEFAULT_TEMPLATE

    def prompt(self, template: str | None = None) -> str:
        if not self.tokens:
            raise SessionError(f"item {self.label!r} has no learned tokens yet; finetune the session first")
        tpl = template if template is not None else self.template
        return tpl.replace("*", " ".join(self.tokens)) if "*" in tpl else tpl


@dataclass
class ImageEntry:
    """An image of the session at its working size, and its items."""

    name: str
    original_file: str
    working: np.ndarray                     # uint8 (H, W, 3)
    labels: np.ndarray                      # int32 (H, W)
    items: list[Item]
    working_file: str = ""                  # set once the working image is written
    fit: dict = field(default_factory=dict)  # how the original became the working image (images.WorkingFit)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.working.shape[1]), int(self.working.shape[0])

    def item_mask(self, item: int) -> np.ndarray:
        return self.labels == item

    def item_index(self, item: int | str) -> int:
        """An item by index or by label."""
        if isinstance(item, str):
            matches = [k for k, it in enumerate(self.items) if it.label == item]
            if not matches:
                raise SessionError(f"image {self.name!r} has no item {item!r}; items: {[i.label for i in self.items]}")
            return matches[0]
        if not 0 <= int(item) < len(self.items):
            raise SessionError(f"image {self.name!r} has items 0..{len(self.items) - 1}; got {item}")
        return int(item)


class Session:
    """Images, their items, the model they were finetuned on, learned weights and the edit history."""

    def __init__(self, folder: Path, data: dict, images: list[ImageEntry]):
        self.folder = Path(folder)
        self._data = data
        self.images = images
        self._weights_cache: dict[str, dict] = {}

    # --- creation ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, image, name: str | None = None, resolution: int = 512,
               multiple: int = 64, labels: np.ndarray | None = None, item_labels: Sequence[str] | None = None,
               overwrite: bool = False) -> "Session":
        """Start a session in a new folder from an image (path, PIL image or array).

        The image is worked on at a size whose short side is about ``resolution``, aspect ratio kept, sides
        cropped down to multiples of ``multiple`` (the model's latent factor: 8 fits SD and SDXL); the
        session records the resize and crop. Until items are set, one item covers the whole image.
        """
        folder = Path(folder)
        if (folder / SESSION_FILE).exists() and not overwrite:
            raise SessionError(f"{folder} already holds a session; open it with Session.open or pass overwrite=True")
        if folder.exists() and any(folder.iterdir()) and not (folder / SESSION_FILE).exists():
            raise SessionError(f"{folder} exists and is not an empty folder or a session; choose another folder")
        data = {"format": FORMAT, "id": secrets.token_hex(3), "resolution": int(resolution), "multiple": int(multiple),
                "model_id": None, "images": [], "weights": None, "finetune": None, "history": []}
        session = cls(folder, data, [])
        if overwrite and folder.exists():
            session._data["id"] = secrets.token_hex(3)
        session.add_image(image, name=name, labels=labels, item_labels=item_labels, save=False)
        session.save()
        return session

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Session":
        folder = Path(folder)
        path = folder / SESSION_FILE
        if not path.exists():
            raise SessionError(f"{folder} is not a session (no {SESSION_FILE}); create one with Session.create")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SessionError(f"{path} is not valid JSON ({exc}); restore it from a backup") from exc
        if data.get("format") != FORMAT:
            raise SessionError(f"{path} has format {data.get('format')}, this version reads format {FORMAT}")
        images = []
        for entry in data["images"]:
            working = np.asarray(Image.open(folder / entry["working"]).convert("RGB"))
            labels = np.load(folder / entry["labels"], allow_pickle=False)
            items = [Item(**it) for it in entry["items"]]
            labels = M.check_labels(labels, len(items), shape=working.shape[:2])
            images.append(ImageEntry(entry["name"], entry["original"], working, labels, items, entry["working"],
                                     entry.get("fit", {})))
        return cls(folder, data, images)

    # --- properties ----------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._data["id"]

    @property
    def model_id(self) -> str | None:
        return self._data["model_id"]

    @property
    def multiple(self) -> int:
        return self._data["multiple"]

    @property
    def history(self) -> list[dict]:
        return self._data["history"]

    @property
    def finetune_state(self) -> dict | None:
        return copy.deepcopy(self._data["finetune"])

    @property
    def has_weights(self) -> bool:
        return self._data["weights"] is not None

    def image(self, index: int | str) -> ImageEntry:
        if isinstance(index, str):
            for entry in self.images:
                if entry.name == index:
                    return entry
            raise SessionError(f"no image named {index!r}; images: {[e.name for e in self.images]}")
        if not 0 <= int(index) < len(self.images):
            raise SessionError(f"the session has images 0..{len(self.images) - 1}; got {index}")
        return self.images[int(index)]

    def image_index(self, index: int | str) -> int:
        return self.images.index(self.image(index))

    # --- images and items ----------------------------------------------------------------------------
    def add_image(self, image, name: str | None = None, labels: np.ndarray | None = None,
                  item_labels: Sequence[str] | None = None, save: bool = True) -> int:
        """Add an image (finetuned jointly with the others, so items can move between them)."""
        if self.has_weights:
            raise SessionError("this session is already finetuned; adding an image needs a new finetune: "
                               "call discard_weights() first")
        source_path = Path(image) if isinstance(image, (str, os.PathLike)) else None
        rgb = to_rgb_array(image)
        fit = fit_working_size(rgb.shape[1], rgb.shape[0], self._data["resolution"], self.multiple)
        working, (w, h) = fit.apply(rgb), fit.size
        index = len(self.images)
        name = name or (source_path.stem if source_path else f"image{index}")
        if any(e.name == name for e in self.images):
            name = f"{name}-{index}"
        ext = source_path.suffix.lower() if source_path and source_path.suffix else ".png"
        original_bytes = source_path.read_bytes() if source_path else png_bytes(rgb)
        if labels is None:
            labels = np.zeros((h, w), np.int32)
            item_labels = list(item_labels or ["image"])
        else:
            labels = np.asarray(labels)
            if labels.shape == rgb.shape[:2]:
                labels = fit.apply_labels(labels)
            elif labels.shape != (h, w):
                labels = M.resize_labels(labels, (h, w))
            if item_labels is None:
                item_labels = [f"item{k}" for k in range(int(labels.max()) + 1)]
            item_labels = list(item_labels)
        labels = M.check_labels(labels, len(item_labels))
        original_rel = self._write_content_named(f"images/{index}-original", ext, original_bytes)
        self.images.append(ImageEntry(name, original_rel, working, labels, [Item(l) for l in item_labels],
                                      fit=fit.as_dict()))
        if save:
            self.save()
        return index

    def set_items(self, image: int | str, labels: np.ndarray, item_labels: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None, save: bool = True) -> None:
        """Replace an image's items with a new partition (a label map at the working size)."""
        entry = self.image(image)
        labels = np.asarray(labels)
        n = len(item_labels) if item_labels is not None else int(labels.max()) + 1
        labels = M.check_labels(labels, n, shape=entry.labels.shape)
        empty = [k for k, a in enumerate(M.item_areas(labels, n)) if a == 0]
        if empty:
            raise M.PartitionError(f"items {empty} have no pixels; drop them (masks.compact_labels) or draw them")
        if self.has_weights:
            raise SessionError("this session is finetuned; changing its items needs a new finetune: "
                               "call discard_weights() first, or use an edit (move/remove) to change masks")
        item_labels = list(item_labels) if item_labels is not None else [f"item{k}" for k in range(n)]
        templates = list(templates) if templates is not None else [DEFAULT_TEMPLATE] * n
        entry.labels = labels.astype(np.int32)
        entry.items = [Item(l, [], t) for l, t in zip(item_labels, templates)]
        if save:
            self.save()

    def rename_item(self, image: int | str, item: int | str, label: str, save: bool = True) -> None:
        entry = self.image(image)
        entry.items[entry.item_index(item)].label = label
        if save:
            self.save()

    def set_template(self, image: int | str, item: int | str, template: str, save: bool = True) -> None:
        entry = self.image(image)
        entry.items[entry.item_index(item)].template = template
        if save:
            self.save()

    def assign_tokens(self, num_tokens: int) -> list[str]:
        """Give each item ``num_tokens`` new token strings (unique to this session). Returns all tokens."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        tokens = []
        for i, entry in enumerate(self.images):
            for k, item in enumerate(entry.items):
                if not item.tokens:
                    item.tokens = [f"<{self.id}{i}.{_slug(item.label)}{k}_{t}>" for t in range(num_tokens)]
                tokens += item.tokens
        return tokens

    def all_tokens(self) -> list[str]:
        return [t for e in self.images for it in e.items for t in it.tokens]

    # --- model and weights ---------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Refuse a model the session was not finetuned on, or whose size multiple does not fit."""
        if self.model_id is not None and self.model_id != model.model_id:
            raise SessionError(
                f"this session was finetuned on {self.model_id!r}, not {model.model_id!r}; load that model, "
                f"or discard_weights() and finetune again")
        for entry in self.images:
            w, h = entry.size
            if w % model.latent_factor or h % model.latent_factor:
                raise SessionError(
                    f"image {entry.name!r} works at {w}x{h}, not a multiple of the model's latent factor "
                    f"{model.latent_factor}; create the session with multiple={model.latent_factor} "
                    "(or a multiple of it)")

    def _write_content_named(self, prefix: str, suffix: str, blob: bytes) -> str:
        """Write ``blob`` as ``<prefix>-<hash><suffix>`` (once: same content, same file); returns the path
        relative to the session folder."""
        rel = f"{prefix}-{hashlib.sha1(blob).hexdigest()[:16]}{suffix}"
        if not (self.folder / rel).exists():
            atomic_write_bytes(self.folder / rel, blob)
        return rel

    def save_weights(self, tensors: dict[str, dict], model_id: str, meta: dict, finetune_state: dict | None) -> None:
        """Store learned tensors (``{"tokens": {...}, "unet": {...}, "optimizer": {...}}``) and metadata."""
        from safetensors.torch import save as st_save
        files = {}
        for kind, tdict in tensors.items():
            if not tdict:
                continue
            blob = st_save({k: v.detach().cpu().contiguous() for k, v in tdict.items()})
            files[kind] = self._write_content_named(f"weights/{kind}", ".safetensors", blob)
        self._data["weights"] = {"files": files, **meta}
        self._data["model_id"] = model_id
        self._data["finetune"] = finetune_state
        self._weights_cache.clear()
        self.save()

    def load_weights(self, kind: str) -> dict:
        """Learned tensors of one kind ('tokens', 'unet', 'optimizer'); empty when none was saved."""
        if kind in self._weights_cache:
            return self._weights_cache[kind]
        from safetensors.torch import load_file
        info = self._data["weights"]
        if info is None or kind not in info["files"]:
            return {}
        path = self.folder / info["files"][kind]
        if not path.exists():
            raise SessionError(f"learned weights file {path} is missing; restore it or finetune the session again")
        tensors = load_file(str(path))
        self._weights_cache[kind] = tensors
        return tensors

    @property
    def weights_meta(self) -> dict:
        info = self._data["weights"] or {}
        return {k: v for k, v in info.items() if k != "files"}

    @property
    def joint_session_ids(self) -> set[str]:
        """Ids of the sessions finetuned together with this one (itself included once finetuned)."""
        return {j["id"] for j in self.weights_meta.get("joint", [{"id": self.id}])}

    def check_joint(self, other: "Session") -> None:
        """Raise unless ``other`` is this session or was finetuned jointly with it (so its items can come in)."""
        if other.id != self.id and other.id not in self.joint_session_ids:
            raise SessionError(f"session {other.folder} was not finetuned jointly with {self.folder}; finetune "
                               "them together (finetune(..., extra_sessions=[...]), or extra_sessions in 02_finetune)")

    def discard_weights(self, save: bool = True) -> None:
        """Forget learned weights and tokens (items stay), e.g. before re-segmenting."""
        self._data["weights"] = None
        self._data["finetune"] = None
        self._data["model_id"] = None
        self._weights_cache.clear()
        for entry in self.images:
            for item in entry.items:
                item.tokens = []
        if save:
            self.save()

    # --- history -------------------------------------------------------------------------------------
    def record_edit(self, manifest: dict, save: bool = True) -> None:
        entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **manifest}
        self._data["history"].append(entry)
        if save:
            self.save()

    # --- persistence ---------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the session: data files first (content-named), then session.json atomically, then delete
        files nothing refers to."""
        self.folder.mkdir(parents=True, exist_ok=True)
        images = []
        for i, entry in enumerate(self.images):
            M.check_labels(entry.labels, len(entry.items), shape=entry.working.shape[:2])
            if not entry.working_file:  # the working image never changes: encode it once
                entry.working_file = self._write_content_named(f"images/{i}-working", ".png", png_bytes(entry.working))
            labels_rel = self._write_content_named(f"items/{i}", ".npy", npy_bytes(entry.labels.astype(np.int32)))
            images.append({"name": entry.name, "original": entry.original_file, "working": entry.working_file,
                           "size": list(entry.size), "fit": entry.fit, "labels": labels_rel,
                           "items": [asdict(it) for it in entry.items]})
        self._data["images"] = images
        atomic_write_bytes(self.folder / SESSION_FILE, json.dumps(self._data, indent=2).encode())
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        referenced = {e[k] for e in self._data["images"] for k in ("labels", "working", "original")}
        if self._data["weights"]:
            referenced |= set(self._data["weights"]["files"].values())
        for sub in ("images", "items", "weights"):
            folder = self.folder / sub
            if folder.exists():
                for f in folder.iterdir():
                    if f"{sub}/{f.name}" not in referenced and not f.name.startswith("."):
                        f.unlink()

    def copy_to(self, folder: str | os.PathLike) -> "Session":
        """A copy of the session folder, e.g. to branch an experiment."""
        folder = Path(folder)
        if folder.exists():
            raise SessionError(f"{folder} exists; copy into a new folder")
        shutil.copytree(self.folder, folder)
        return Session.open(folder)

    def __repr__(self) -> str:
        items = ", ".join(f"{e.name}: {len(e.items)} items @ {e.size[0]}x{e.size[1]}" for e in self.images)
        return f"Session({str(self.folder)!r}, {items}, model={self.model_id!r})"
