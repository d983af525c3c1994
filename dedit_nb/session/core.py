"""The ``Session`` class: a session's images, items, model, weights and history as one object. Its folder is
read through :mod:`.schema` and written through :mod:`.store`; joint checkpoints are in :mod:`.checkpoints`."""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import re
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .. import masks as M
from ..images import fit_working_size, to_rgb_array
from ..profiles import SD1
from .bank import BankItems
from .checkpoints import _generation, save_joint_weights
from .items import DEFAULT_TEMPLATE, ImageEntry, Item, SessionError, _slug, unique_names
from .schema import FORMAT, SESSION_FILE, SessionRecord, _check_session, _load_images, _read_json, _read_weights_file
from .store import (LOCK_FILE, _check_new_folder, _collect_garbage, _copy_folder, _merge, _referenced, _refuse_gone,
                    _remove_stale_temporaries, _staged_name, _state, atomic_write_bytes, npy_bytes, png_bytes,
                    session_lock)

if TYPE_CHECKING:
    from ..models import DEditModel

SESSION_ID = re.compile(r"[0-9a-z]{1,16}")   # it starts token names: "<{id}{image}.{item}{k}_{t}>"


class Session(BankItems):
    """Images, their items, the model they were finetuned on, learned weights, bank items and the edit history."""

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
               multiple: int = SD1.multiple, labels: np.ndarray | None = None, item_names: Sequence[str] | None = None,
               overwrite: bool = False, save: bool = True, profile: dict | None = None,
               session_id: str | None = None) -> "Session":
        """Start a session in a new folder from an image (path, PIL image or array).

        The image is worked on at a size whose short side is about ``resolution``, aspect ratio kept, sides
        cropped down to multiples of ``multiple`` (the model's latent factor: 8 fits SD and SDXL); the
        session records the resize and crop. Until items are set, one item covers the whole image. With
        ``save=False`` nothing is written until :meth:`save`. ``profile``: how the size was chosen
        (:meth:`dedit_nb.profiles.Resolved.record`), kept in session.json. ``session_id`` (random when not given)
        starts the names of the session's learned tokens: two sessions with one id train the same token names.
        """
        folder = Path(folder)
        _check_new_folder(folder, overwrite)
        data = {"format": FORMAT, "id": secrets.token_hex(3), "resolution": int(resolution), "multiple": int(multiple),
                "model_id": None, "images": [], "weights": None, "finetune": None, "history": []}
        if profile is not None:
            data["profile"] = profile
        if session_id is not None:
            if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
                raise SessionError(f"session_id {session_id!r} is not 1 to 16 lowercase letters and digits (it "
                                   "starts the names of the session's tokens); pass one such as 'a1b2c3', or none "
                                   "for a random one")
            data["id"] = session_id
        session = cls(folder, data, [], base=None, overwrite=overwrite)
        session.add_image(image, name=name, labels=labels, item_names=item_names, save=False)
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

    def reload(self) -> None:
        """Read the session again from its folder, dropping unsaved changes (a session never saved has nothing
        there to read: it stays as it is)."""
        if self._base is None:
            return
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
                  item_names: Sequence[str] | None = None, save: bool = True) -> int:
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
            item_names = list(item_names or ["image"])
        else:
            labels = np.asarray(labels)
            if labels.shape == rgb.shape[:2]:
                labels = fit.apply_labels(labels)
            elif labels.shape != (h, w):
                labels = M.resize_labels(labels, (h, w))
            if item_names is None:
                item_names = [f"item{k}" for k in range(int(labels.max()) + 1)]
            item_names = list(item_names)
        labels = M.check_labels(labels, len(item_names))
        item_names = unique_names(item_names)
        original_rel = self._stage(f"images/{index}-original", ext, original_bytes)
        self.images.append(ImageEntry(name, original_rel, working, labels, [Item(l) for l in item_names],
                                      fit=fit.as_dict()))
        if save:
            self.save()
        return index

    def set_items(self, image: int | str, labels: np.ndarray, item_names: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None, save: bool = True) -> None:
        """Replace an image's items with a new partition (a label map at the working size)."""
        entry = self.image(image)
        labels = np.asarray(labels)
        if (item_names is None and labels.size and np.issubdtype(labels.dtype, np.integer)
                and int(labels.max()) >= labels.size):  # more items than pixels: some would be empty
            raise M.PartitionError(f"label values go up to {int(labels.max())} but the map has {labels.size} "
                                   f"pixels; number the items 0..K-1 (masks.compact_labels) or pass item_names")
        n = len(item_names) if item_names is not None else int(labels.max()) + 1
        labels = M.check_labels(labels, n, shape=entry.labels.shape)
        empty = [k for k, a in enumerate(M.item_areas(labels, n)) if a == 0]
        if empty:
            raise M.PartitionError(f"items {empty} have no pixels; drop them (masks.compact_labels) or draw them")
        if self.has_weights:
            raise SessionError("this session is finetuned; changing its items needs a new finetune: "
                               "call discard_weights() first, or use an edit (move/remove) to change masks")
        item_names = unique_names(item_names) if item_names is not None else [f"item{k}" for k in range(n)]
        templates = list(templates) if templates is not None else [DEFAULT_TEMPLATE] * n
        entry.labels = labels.astype(np.int32)
        entry.items = [Item(l, [], t) for l, t in zip(item_names, templates)]
        if save:
            self.save()

    def rename_item(self, image: int | str, item: int | str, name: str, save: bool = True) -> None:
        entry = self.image(image)
        k = entry.item_index(item)
        if any(it.name == name for j, it in enumerate(entry.items) if j != k):
            raise SessionError(f"image {entry.name!r} already has an item named {name!r}; item names are unique "
                               "(an edit names its item), choose another")
        entry.items[k].name = name
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
                    item.tokens = [f"<{self.id}{i}.{_slug(item.name)}{k}_{t}>" for t in range(num_tokens)]
                tokens += item.tokens
        return tokens

    def all_tokens(self) -> list[str]:
        return [t for e in self.images for it in e.items for t in it.tokens]

    # --- model and weights ---------------------------------------------------------------------------
    def check_model(self, model: DEditModel) -> None:
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
        rel = _staged_name(prefix, suffix, blob)
        self._staged[rel] = blob
        return rel

    def _stage_weights(self, blobs: dict[str, bytes]) -> dict[str, str]:
        return {kind: self._stage(f"weights/{kind}", ".safetensors", blob) for kind, blob in blobs.items()}

    def save_weights(self, tensors: dict[str, dict], model_id: str, meta: dict, finetune_state: dict | None) -> None:
        """Store learned tensors (``{"tokens": {...}, "unet": {...}, "optimizer": {...}}``) and metadata."""
        save_joint_weights([self], tensors, model_id, meta, finetune_state)

    @property
    def pending(self) -> dict | None:
        """The checkpoint a joint save left beside the current weights (files, metadata, model id, finetune
        state), or None (see :mod:`.checkpoints`)."""
        return copy.deepcopy(self._data.get("pending"))

    def save_pending(self, blobs: dict[str, bytes], info: dict) -> None:
        """Save a checkpoint (safetensors bytes by kind; ``info``: its metadata with ``model_id`` and
        ``finetune``) as pending, beside the current weights, which stay current."""
        self._data["pending"] = {"files": self._stage_weights(blobs), **info}
        self.save()

    def promote_pending(self) -> None:
        """Make the pending checkpoint the current weights."""
        pending = self._data.pop("pending")
        self._data["weights"] = {k: v for k, v in pending.items() if k not in ("model_id", "finetune")}
        self._data["model_id"] = pending["model_id"]
        self._data["finetune"] = pending["finetune"]
        self._weights_cache.clear()
        self.save()

    def drop_pending(self) -> None:
        """Forget the pending checkpoint (one that did not reach every member of its joint finetune)."""
        self._data.pop("pending")
        self.save()

    def weights_file(self, kind: str) -> Path | None:
        """The file of the learned tensors of one kind, or None when none was saved."""
        info = self._data["weights"]
        return self.folder / info["files"][kind] if info is not None and kind in info["files"] else None

    def load_weights(self, kind: str) -> dict:
        """Learned tensors of one kind ('tokens', 'unet', 'optimizer'); empty when none was saved."""
        if kind in self._weights_cache:
            return self._weights_cache[kind]
        path = self.weights_file(kind)
        if path is None:
            return {}
        with session_lock(self.folder, reading=True):
            if not path.exists():
                self._refuse_replaced_weights(_read_json(self.folder))
                raise SessionError(f"learned weights file {path} is missing; restore it or finetune the session "
                                   "again (resume=False)")
            tensors = _read_weights_file(path, kind)
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

    def edit_requests(self) -> list[dict]:
        """The requests of the edits recorded in the history, oldest first (``manifest["request"]``: what
        ``Editor.replay`` runs again), each with the ``time`` it was recorded."""
        return [{"time": h.get("time"), **copy.deepcopy(h["request"])} for h in self.history if "request" in h]

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
        to it (see :func:`.store._merge`), write new data files, then session.json atomically, then delete files
        that nothing refers to."""
        ours = self._serialize()
        if self._base is None:
            _check_new_folder(self.folder, self._overwrite)
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():     # (the lock needs the folder; a missing session.json is found below)
            _refuse_gone(self.folder)
        with session_lock(self.folder):
            merged = _merge(self.folder, self._base, self._overwrite, _read_json(self.folder), ours)
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
                record = SessionRecord.from_json(merged, self.folder / SESSION_FILE)
                self.images = _load_images(self.folder, record.images)
                self._weights_cache.clear()

    def copy_to(self, folder: str | os.PathLike) -> "Session":
        """A copy of the session folder, e.g. to branch an experiment, or to edit a session in a folder you
        cannot write (the copy is yours to write, whatever the source's permissions).

        The copy is made in a hidden folder beside ``folder`` and renamed into place once it is complete and
        checked, so a copy that fails (a link to nothing among the session's files, a full disk) leaves
        nothing behind. Links are copied as the files they point to; links to nothing are skipped."""
        folder = Path(folder)
        _copy_folder(self.folder, folder)
        return Session.open(folder)

    def __repr__(self) -> str:
        items = ", ".join(f"{e.name}: {len(e.items)} items @ {e.size[0]}x{e.size[1]}" for e in self.images)
        return f"Session({str(self.folder)!r}, {items}, model={self.model_id!r})"
