"""The session: one folder that carries an edit project through every notebook.

Layout::

    session.json              what everything is (format, images, items, model, weights, finetune, history)
    images/<i>-original-<hash>.<ext>  the user's file, byte for byte (never modified)
    images/<i>-working-<hash>.png     the image at the working size the model sees
    items/<i>-<hash>.npy       label map of image i (int32, one item index per pixel)
    weights/<kind>-<hash>.safetensors  learned item tokens, trained UNet parameters, optimizer state
    .session.lock             taken by every write (and by reads of several files)

Every write is a read-modify-write under the folder's lock: ``session.json`` is read again, this writer's
change is applied to it (history records are appended to what is there; any other change must start from
what is there, or the write is refused with the fix), the new content-named data files are written, then
``session.json`` atomically, then files nothing refers to are deleted. Several processes can therefore edit,
record and finetune the same session, and a crash at any point leaves the previous session intact.

A joint finetune saves each checkpoint in two phases (:func:`save_joint_weights`): first as ``pending`` in
every member, then as the current weights in every member; :func:`settle_joint` brings members that a kill
left between the phases to the newest checkpoint every member holds.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from . import masks as M
from .images import fit_working_size, to_rgb_array
from .profiles import SD1

FORMAT = 1
SESSION_FILE = "session.json"
LOCK_FILE = ".session.lock"
# what making or opening the lock file fails with in a folder the user may read but not write
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
LOCK_TIMEOUT = 600.0            # seconds a writer waits for another (a large weights save takes seconds)
DEFAULT_TEMPLATE = "*"
DATA_FOLDERS = ("images", "items", "weights")
HISTORY = "history"             # the one key merged by appending; every other key is session state


class SessionError(RuntimeError):
    """A session folder or an operation on it that is not valid, with the fix."""


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the process's umask."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part. The file
    gets the permissions of any new file under the user's umask (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def session_lock(folder: Path, reading: bool = False):
    """The folder's write lock (shared by every process and thread; re-entrant within one thread); yields
    whether it is held. A folder the lock file cannot be made in (read-only: a shared course folder, a
    mounted drive) cannot be written; ``reading`` then goes on without the lock, since session.json and the
    data files are each replaced atomically and :func:`_check_session` refuses a view that misses a file."""
    lock = FileLock(str(Path(folder) / LOCK_FILE), timeout=LOCK_TIMEOUT, is_singleton=True)
    try:
        lock.acquire()
    except Timeout as exc:
        raise SessionError(f"{folder} stayed locked by another process for {LOCK_TIMEOUT:.0f} s (a finetune "
                           "saving a large checkpoint?); try again once it is done") from exc
    except OSError as exc:
        if exc.errno not in UNWRITABLE:     # a full disk, no flock on the file system, ...: not read-only
            raise
        if not reading:
            raise SessionError(f"{folder} cannot be written ({exc.strerror or exc}); work on a copy in a folder "
                               f"you can write: Session.open({str(folder)!r}).copy_to('my-session') (changes not "
                               "saved here are not in the copy: make them again there)") from exc
    else:
        try:
            yield True
        finally:
            lock.release()
        return
    yield False     # outside the except block, so an error of the caller's is not chained to the lock's


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


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with each repeated one numbered (``cup``, ``cup-2``...): an edit names its item, so one name
    must not stand for two items."""
    taken: set[str] = set()
    unique = []
    for name in names:
        fresh, n = name, 2
        while fresh in taken or (fresh != name and fresh in names):
            fresh, n = f"{name}-{n}", n + 1
        taken.add(fresh)
        unique.append(fresh)
    return unique


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
            if len(matches) > 1:     # a session written before names were kept unique
                raise SessionError(f"image {self.name!r} has {len(matches)} items named {item!r} (indexes {matches}); "
                                   "name the item by its index, or rename one (rename_item)")
            return matches[0]
        if not 0 <= int(item) < len(self.items):
            raise SessionError(f"image {self.name!r} has items 0..{len(self.items) - 1}; got {item}")
        return int(item)


class Session:
    """Images, their items, the model they were finetuned on, learned weights and the edit history."""

    def __init__(self, folder: Path, data: dict, images: list[ImageEntry], base: dict | None = None,
                 overwrite: bool = False):
        self.folder = Path(folder)
        self._data = data
        self.images = images
        self._base = base                    # session.json as last read or written (None: a new session)
        self._overwrite = overwrite          # a new session may replace one already in the folder
        self._staged: dict[str, bytes] = {}  # content-named files to write with the next save
        self._weights_cache: dict[str, dict] = {}

    # --- creation ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, image, name: str | None = None, resolution: int = SD1.resolution,
               multiple: int = SD1.multiple, labels: np.ndarray | None = None, item_labels: Sequence[str] | None = None,
               overwrite: bool = False, save: bool = True, profile: dict | None = None) -> "Session":
        """Start a session in a new folder from an image (path, PIL image or array).

        The image is worked on at a size whose short side is about ``resolution``, aspect ratio kept, sides
        cropped down to multiples of ``multiple`` (the model's latent factor: 8 fits SD and SDXL); the
        session records the resize and crop. Until items are set, one item covers the whole image. With
        ``save=False`` nothing is written until :meth:`save`. ``profile``: how the size was chosen
        (:meth:`dedit_nb.profiles.Resolved.record`), kept in session.json.
        """
        folder = Path(folder)
        _check_new_folder(folder, overwrite)
        data = {"format": FORMAT, "id": secrets.token_hex(3), "resolution": int(resolution), "multiple": int(multiple),
                "model_id": None, "images": [], "weights": None, "finetune": None, "history": []}
        if profile is not None:
            data["profile"] = profile
        session = cls(folder, data, [], base=None, overwrite=overwrite)
        session.add_image(image, name=name, labels=labels, item_labels=item_labels, save=False)
        if save:
            session.save()
        return session

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Session":
        """Open a session folder. Everything it refers to is checked first (a broken session raises a
        :class:`SessionError` naming the file and the fix, and the folder is left as it is); then hidden
        ``.tmp`` files of saves that were killed are removed."""
        folder = Path(folder)
        if not (folder / SESSION_FILE).exists():
            raise SessionError(f"{folder} is not a session (no {SESSION_FILE}); create one with Session.create")
        if not (folder / LOCK_FILE).exists():  # made before sessions had locks: add none to a broken one
            _check_session(folder)
        with session_lock(folder, reading=True) as locked:
            data, images = _check_session(folder)
            if locked:
                _remove_stale_temporaries(folder)
        return cls(folder, data, images, base=copy.deepcopy(data))

    def _reload(self) -> None:
        """Read the session again from disk (dropping unsaved changes)."""
        fresh = Session.open(self.folder)
        self._data, self.images, self._base = fresh._data, fresh.images, fresh._base
        self._staged.clear()
        self._weights_cache.clear()

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
    def profile(self) -> dict | None:
        """How the working size was chosen (the model profile, each value's source), when it was recorded."""
        return self._data.get("profile")

    @property
    def history(self) -> list[dict]:
        return self._data["history"]

    @property
    def finetune_state(self) -> dict | None:
        return copy.deepcopy(self._data["finetune"])

    @property
    def weights_generation(self) -> str | None:
        """The id of the finetune checkpoint whose weights this session holds (the same in every member of a
        joint finetune)."""
        return _generation(self._data)

    @property
    def writable(self) -> bool:
        """Whether this process can write the session's folder (take its lock): a shared course folder or a
        read-only mount can be opened and edited from, but not recorded into."""
        with session_lock(self.folder, reading=True) as locked:
            return locked

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
        item_labels = unique_names(item_labels)
        original_rel = self._stage(f"images/{index}-original", ext, original_bytes)
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
        if (item_labels is None and labels.size and np.issubdtype(labels.dtype, np.integer)
                and int(labels.max()) >= labels.size):  # more items than pixels: some would be empty
            raise M.PartitionError(f"label values go up to {int(labels.max())} but the map has {labels.size} "
                                   f"pixels; number the items 0..K-1 (masks.compact_labels) or pass item_labels")
        n = len(item_labels) if item_labels is not None else int(labels.max()) + 1
        labels = M.check_labels(labels, n, shape=entry.labels.shape)
        empty = [k for k, a in enumerate(M.item_areas(labels, n)) if a == 0]
        if empty:
            raise M.PartitionError(f"items {empty} have no pixels; drop them (masks.compact_labels) or draw them")
        if self.has_weights:
            raise SessionError("this session is finetuned; changing its items needs a new finetune: "
                               "call discard_weights() first, or use an edit (move/remove) to change masks")
        item_labels = unique_names(item_labels) if item_labels is not None else [f"item{k}" for k in range(n)]
        templates = list(templates) if templates is not None else [DEFAULT_TEMPLATE] * n
        entry.labels = labels.astype(np.int32)
        entry.items = [Item(l, [], t) for l, t in zip(item_labels, templates)]
        if save:
            self.save()

    def rename_item(self, image: int | str, item: int | str, label: str, save: bool = True) -> None:
        entry = self.image(image)
        k = entry.item_index(item)
        if any(it.label == label for j, it in enumerate(entry.items) if j != k):
            raise SessionError(f"image {entry.name!r} already has an item named {label!r}; item names are unique "
                               "(an edit names its item), choose another")
        entry.items[k].label = label
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

    def _stage(self, prefix: str, suffix: str, blob: bytes) -> str:
        """Name ``blob`` ``<prefix>-<hash><suffix>`` and keep it for the next save (which writes it, once:
        same content, same file); returns the path relative to the session folder."""
        rel = f"{prefix}-{hashlib.sha1(blob).hexdigest()[:16]}{suffix}"
        self._staged[rel] = blob
        return rel

    def _stage_weights(self, blobs: dict[str, bytes]) -> dict[str, str]:
        return {kind: self._stage(f"weights/{kind}", ".safetensors", blob) for kind, blob in blobs.items()}

    def save_weights(self, tensors: dict[str, dict], model_id: str, meta: dict, finetune_state: dict | None) -> None:
        """Store learned tensors (``{"tokens": {...}, "unet": {...}, "optimizer": {...}}``) and metadata."""
        save_joint_weights([self], tensors, model_id, meta, finetune_state)

    def weights_file(self, kind: str) -> Path | None:
        """The file of the learned tensors of one kind, or None when none was saved."""
        info = self._data["weights"]
        return self.folder / info["files"][kind] if info is not None and kind in info["files"] else None

    def load_weights(self, kind: str) -> dict:
        """Learned tensors of one kind ('tokens', 'unet', 'optimizer'); empty when none was saved."""
        if kind in self._weights_cache:
            return self._weights_cache[kind]
        from safetensors.torch import load_file
        path = self.weights_file(kind)
        if path is None:
            return {}
        with session_lock(self.folder, reading=True):
            if not path.exists():
                self._refuse_replaced_weights(_read_json(self.folder))
                raise SessionError(f"learned weights file {path} is missing; restore it or finetune the session "
                                   "again (resume=False)")
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
        """Raise unless ``other`` is this session or holds the same joint finetune as it (so its items can come
        in: a member finetuned again on its own since has tokens this session's weights never saw)."""
        if other.id == self.id:
            return
        fix = "finetune them together (finetune(..., extra_sessions=[...]), or extra_sessions in 02_finetune)"
        if other.id not in self.joint_session_ids:
            raise SessionError(f"session {other.folder} was not finetuned jointly with {self.folder}; {fix}")
        if self.weights_generation != other.weights_generation:
            raise SessionError(f"session {other.folder} was finetuned again since its joint finetune with "
                               f"{self.folder} (their checkpoints differ); {fix}")

    def check_weights_current(self) -> None:
        """Raise when another process replaced (or discarded) the learned weights since this session was read:
        an editor must not go on with the old ones and record its edits into the new finetune's history."""
        if self._base is None:
            return
        with session_lock(self.folder, reading=True):
            disk = _read_json(self.folder)
        self._refuse_replaced_weights(disk)

    def _refuse_replaced_weights(self, disk: dict | None) -> None:
        if (disk or {}).get("weights") != self._data["weights"]:
            raise SessionError(f"the learned weights of {self.folder} were replaced (by a finetune in another "
                               "process) since it was opened; open the session again (Session.open)")

    def discard_weights(self, save: bool = True) -> None:
        """Forget learned weights and tokens (items stay), e.g. before re-segmenting."""
        self._data["weights"] = None
        self._data["finetune"] = None
        self._data["model_id"] = None
        self._data.pop("pending", None)
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
    def _serialize(self) -> dict:
        images = []
        for i, entry in enumerate(self.images):
            M.check_labels(entry.labels, len(entry.items), shape=entry.working.shape[:2])
            if not entry.working_file:  # the working image never changes: encode it once
                entry.working_file = self._stage(f"images/{i}-working", ".png", png_bytes(entry.working))
            labels_rel = self._stage(f"items/{i}", ".npy", npy_bytes(entry.labels.astype(np.int32)))
            images.append({"name": entry.name, "original": entry.original_file, "working": entry.working_file,
                           "size": list(entry.size), "fit": entry.fit, "labels": labels_rel,
                           "items": [asdict(it) for it in entry.items]})
        return {**copy.deepcopy(self._data), "images": images}

    def save(self) -> None:
        """Write this session's changes: under the folder's lock, read session.json again, apply the changes
        to it (see :meth:`_merge`), write new data files, then session.json atomically, then delete files
        that nothing refers to."""
        ours = self._serialize()
        if self._base is None:
            _check_new_folder(self.folder, self._overwrite)
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():     # (the lock needs the folder; a missing session.json is found below)
            self._refuse_gone()
        with session_lock(self.folder):
            merged = self._merge(_read_json(self.folder), ours)
            try:
                text = json.dumps(merged, indent=2, allow_nan=False)
            except ValueError as exc:
                raise SessionError(f"this change of {self.folder} holds a NaN or infinite number ({exc}); it was "
                                   "not saved") from exc
            for rel in _referenced(merged):
                if rel in self._staged and not (self.folder / rel).exists():
                    atomic_write_bytes(self.folder / rel, self._staged[rel])
            atomic_write_bytes(self.folder / SESSION_FILE, text.encode())
            # what is on disk now, before anything else can be interrupted: a record must not be written twice
            self._data, self._base, self._overwrite = merged, copy.deepcopy(merged), False
            self._staged.clear()
            _collect_garbage(self.folder, merged)
            others_state = _state(merged) != _state(ours)
            if others_state:  # another process's change was kept: take its images and weights
                self.images = _load_images(self.folder, merged)
                self._weights_cache.clear()

    def _merge(self, disk: dict | None, ours: dict) -> dict:
        """session.json as it is on disk with this writer's change applied: records added to the history
        since this session was read are appended; any other change replaces the state, and is refused when
        another process changed the state too (a finetune and a re-segmentation at once, say)."""
        path = self.folder / SESSION_FILE
        base = self._base
        if disk is None and base is not None:
            self._refuse_gone()
        if disk is None:
            return ours
        if base is None:
            if not self._overwrite:
                raise SessionError(f"{self.folder} already holds a session; open it with Session.open or pass "
                                   "overwrite=True")
            return ours
        if disk.get("id") != base["id"]:
            raise SessionError(f"{path} now holds another session (id {disk.get('id')!r}, not {base['id']!r}), "
                               "created after this one was opened; open it again")
        ours_changed, disk_changed = _state(ours) != _state(base), _state(disk) != _state(base)
        if ours_changed and disk_changed and _state(ours) != _state(disk):
            changed = sorted(k for k in set(disk) | set(base) if k != HISTORY and disk.get(k) != base.get(k))
            raise SessionError(f"{path} was changed by another process since this session was opened "
                               f"({', '.join(changed)}); this change was not saved: open the session again "
                               "(Session.open) and redo it")
        merged = dict(_state(ours) if ours_changed else _state(disk))
        merged[HISTORY] = list(disk.get(HISTORY, [])) + ours[HISTORY][len(base[HISTORY]):]
        return merged

    def _refuse_gone(self) -> None:
        raise SessionError(f"{self.folder} no longer holds this session (its folder or session.json was deleted or "
                           "moved since it was opened); nothing was written: put the folder back, or open the "
                           "session where it is now")

    def copy_to(self, folder: str | os.PathLike) -> "Session":
        """A copy of the session folder, e.g. to branch an experiment, or to edit a session in a folder you
        cannot write (the copy is yours to write, whatever the source's permissions).

        The copy is made in a hidden folder beside ``folder`` and renamed into place once it is complete and
        checked, so a copy that fails (a link to nothing among the session's files, a full disk) leaves
        nothing behind. Links are copied as the files they point to; links to nothing are skipped."""
        folder = Path(folder)
        if folder.exists() or folder.is_symlink():
            raise SessionError(f"{folder} exists; copy into a new folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".copy"))
        try:
            with session_lock(self.folder, reading=True):
                shutil.copytree(self.folder, staging, ignore=shutil.ignore_patterns(LOCK_FILE, ".*.tmp"),
                                ignore_dangling_symlinks=True, dirs_exist_ok=True)
            for path in (staging, *staging.rglob("*")):
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
            _check_session(staging)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Session.open(folder)

    def __repr__(self) -> str:
        items = ", ".join(f"{e.name}: {len(e.items)} items @ {e.size[0]}x{e.size[1]}" for e in self.images)
        return f"Session({str(self.folder)!r}, {items}, model={self.model_id!r})"


# --- joint checkpoints -------------------------------------------------------------------------------
def save_joint_weights(sessions: Sequence[Session], tensors: dict[str, dict], model_id: str, meta: dict,
                       finetune_state: dict | None) -> None:
    """Save one checkpoint into every member of a (joint) finetune, all or nothing: each member first
    stores it as ``pending``, then each makes it current. The checkpoint carries a new generation id, so
    :func:`settle_joint` can tell after a kill which checkpoint every member holds."""
    from safetensors.torch import save as st_save
    blobs = {kind: st_save({k: v.detach().cpu().contiguous() for k, v in tdict.items()})
             for kind, tdict in tensors.items() if tdict}
    generation = secrets.token_hex(8)
    state = {**(finetune_state or {}), "generation": generation}
    for s in sessions:
        s._data["pending"] = {"files": s._stage_weights(blobs), **meta, "model_id": model_id, "finetune": state}
        s.save()
    for s in sessions:
        _promote_pending(s)


def _promote_pending(session: Session) -> None:
    pending = session._data.pop("pending")
    session._data["weights"] = {k: v for k, v in pending.items() if k not in ("model_id", "finetune")}
    session._data["model_id"] = pending["model_id"]
    session._data["finetune"] = pending["finetune"]
    session._weights_cache.clear()
    session.save()


def _generation(info: dict | None) -> str | None:
    return ((info or {}).get("finetune") or {}).get("generation")


def settle_joint(sessions: Sequence[Session]) -> list[Session]:
    """Bring the members of a joint finetune to the newest checkpoint that every one of them holds (a kill
    between two members' saves leaves one a checkpoint ahead), and return them in the order they were
    finetuned in (that order fixes the token initialisation, so a resume equals an uninterrupted run)."""
    sessions = list(sessions)
    for s in sessions:
        if s._base is not None:        # saved before: read what other processes (or a kill) left
            s._reload()
    given = {s.id for s in sessions}
    recorded = [j for s in sessions for info in (s._data["weights"], s._data.get("pending")) if info
                for j in info.get("joint", [])]
    if recorded and {j["id"] for j in recorded} != given:
        folders = sorted({j["folder"] for j in recorded})
        raise SessionError(f"this session's finetune was started with other sessions ({folders}); pass the "
                           "same extra_sessions, or resume=False to start over")
    held = [{_generation({"finetune": s._data["finetune"]}), _generation(s._data.get("pending"))} - {None}
            for s in sessions]
    complete = set.intersection(*held) if held else set()
    for s in sessions:
        pending = _generation(s._data.get("pending"))
        if pending is not None and pending in complete:
            _promote_pending(s)
        elif pending is not None:          # written by a save that did not reach every member
            s._data.pop("pending")
            s.save()
    checkpoints = {json.dumps({k: (s._data["finetune"] or {}).get(k) for k in ("generation", "stage", "step", "done")})
                   for s in sessions}
    if len(checkpoints) > 1:
        raise SessionError("the jointly finetuned sessions " + ", ".join(str(s.folder) for s in sessions)
                           + " hold different checkpoints (saved by a version without joint checkpoints, or "
                           "changed by hand); finetune them again with resume=False")
    order = [j["id"] for j in recorded]
    return sorted(sessions, key=lambda s: order.index(s.id) if s.id in order else len(order))


# --- reading and checking a session folder -----------------------------------------------------------
_FIX_JSON = "restore session.json from a backup, or make the session again (01_segment)"


def _check_session(folder: Path) -> tuple[dict, list[ImageEntry]]:
    """session.json, the images and label maps it names (loaded), and its weights files (headers), checked."""
    data = _read_session_json(folder)
    images = _load_images(folder, data)
    _check_weight_files(folder, data)
    return data, images


def _check_new_folder(folder: Path, overwrite: bool) -> None:
    if (folder / SESSION_FILE).exists() and not overwrite:
        raise SessionError(f"{folder} already holds a session; open it with Session.open or pass overwrite=True")
    if folder.exists() and not (folder / SESSION_FILE).exists() and any(
            p.name != LOCK_FILE for p in folder.iterdir()):
        raise SessionError(f"{folder} exists and is not an empty folder or a session; choose another folder")


def _read_json(folder: Path) -> dict | None:
    """session.json as it is on disk (None when there is none), checked."""
    if not (folder / SESSION_FILE).exists():
        return None
    return _read_session_json(folder)


def _read_session_json(folder: Path) -> dict:
    path = folder / SESSION_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SessionError(f"{path} is not valid JSON ({exc}); {_FIX_JSON}") from exc
    _check_structure(data, path)
    return data


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


def _check_structure(data, path: Path) -> None:
    """Every key and type ``Session`` relies on, so a damaged session.json is named, not a TypeError."""
    if not isinstance(data, dict):
        _fail(path, f"holds a JSON {type(data).__name__}, not an object with the session's keys")
    fmt = data.get("format")
    if not _is_int(fmt):
        _fail(path, f'has "format": {json.dumps(fmt)} ({type(fmt).__name__}); this version reads '
              f'"format": {FORMAT}, a number', f'write "format": {FORMAT} if the rest of the file is intact, or '
              f"{_FIX_JSON}")
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
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
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
            tokens = item.get("tokens", []) if isinstance(item, dict) else None
            ok = (isinstance(item, dict) and set(item) <= {"label", "tokens", "template"}
                  and isinstance(item.get("label"), str) and isinstance(item.get("template", ""), str)
                  and isinstance(tokens, list) and all(isinstance(t, str) for t in tokens))
            if not ok:
                _fail(path, f"{where}.items[{k}] should be {{label: str, tokens: [str], template: str}}, got "
                      f"{json.dumps(item)[:80]}")
    for key in ("weights", "pending"):
        if data.get(key) is not None:
            _check_weights_entry(data, key, path)
    if (data.get("weights") is None) != (data.get("finetune") is None):
        _fail(path, "has learned weights without a finetune state, or a finetune state without weights",
              "restore session.json from a backup, or finetune the session again (resume=False)")


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
    if info.get("mode") not in ("attn", "lora"):
        _fail(path, f"{key}.mode should be 'attn' or 'lora', got {json.dumps(info.get('mode'))}", fix)


def _load_images(folder: Path, data: dict) -> list[ImageEntry]:
    images = []
    for entry in data["images"]:
        name = entry["name"]
        working_path, labels_path = folder / entry["working"], folder / entry["labels"]
        fix = f"restore it from a backup, or make the session again from its original ({entry['original']})"
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
            items = [Item(**it) for it in entry["items"]]
            labels = M.check_labels(labels, len(items), shape=working.shape[:2])
        except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError for damaged files
            raise SessionError(f"{labels_path} (the label map of image {name!r}) is not a valid label map of "
                               f"{len(entry['items'])} items ({exc}); restore it from a backup, or set the items "
                               "again (01_segment with overwrite=True)") from exc
        images.append(ImageEntry(name, entry["original"], working, labels, items, entry["working"],
                                 entry.get("fit", {})))
    return images


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


# the names this session gives its data files (``Session._stage``) and their temporaries (atomic_write_bytes):
# only those are ever deleted; anything else in a data folder is the user's
OWN_FILE = {"images": re.compile(r"\d+-(original|working)-[0-9a-f]{16}(\.[^./]+)?"),
            "items": re.compile(r"\d+-[0-9a-f]{16}\.npy"),
            "weights": re.compile(r"[a-z]+-[0-9a-f]{16}\.safetensors")}
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")
_told_left_alone: set[Path] = set()


def _own_files(folder: Path, sub: str) -> list[Path]:
    """The regular files of data folder ``sub`` that this project names (data files and temporaries of its
    writes). A data folder that is a symlink is not searched: it may lead to a folder of the user's."""
    path = folder / sub
    if path.is_symlink():
        _tell_once(path, f"{path} is a link (to {os.path.realpath(path)}); files there are never deleted, so data "
                         "files this session no longer uses stay there")
        return []
    if not path.is_dir():
        return []
    own, others = [], []
    for f in path.iterdir():
        temporary = TEMPORARY.fullmatch(f.name)
        name = temporary["name"] if temporary else f.name
        ours = OWN_FILE[sub].fullmatch(name) is not None
        (own if ours and stat.S_ISREG(f.lstat().st_mode) else others).append(f)
    if others:
        names = sorted(f.name for f in others)
        _tell_once(path, f"{path} holds {len(others)} entries this session did not write ({', '.join(names[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); they are left alone")
    return own


def _tell_once(path: Path, message: str) -> None:
    if path not in _told_left_alone:
        _told_left_alone.add(path)
        warnings.warn(message, stacklevel=4)


def _remove_stale_temporaries(folder: Path) -> None:
    """Hidden ``.tmp`` files are written under the lock, so while it is held any left are from killed saves
    (of ``session.json`` in the root, of data files in the data folders)."""
    root = [f for f in folder.glob(f".{SESSION_FILE}.*.tmp") if TEMPORARY.fullmatch(f.name)]
    for f in root + [f for sub in DATA_FOLDERS for f in _own_files(folder, sub) if TEMPORARY.fullmatch(f.name)]:
        if stat.S_ISREG(f.lstat().st_mode):
            f.unlink()


def _state(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != HISTORY}


def _referenced(data: dict) -> set[str]:
    refs = {e[k] for e in data["images"] for k in ("labels", "working", "original")}
    for key in ("weights", "pending"):
        if data.get(key):
            refs |= set(data[key]["files"].values())
    return refs


def _collect_garbage(folder: Path, data: dict) -> None:
    """Delete the data files this session wrote that ``data`` (session.json as just written, under the lock)
    no longer refers to; nothing else (see :func:`_own_files`)."""
    referenced = _referenced(data)
    for sub in DATA_FOLDERS:
        for f in _own_files(folder, sub):
            if f"{sub}/{f.name}" not in referenced and not TEMPORARY.fullmatch(f.name):
                f.unlink()
