"""A session's bank items: items learned in other sessions (bank files, :mod:`dedit_nb.bank`), imported
without training. ``session.json`` lists them under ``"bank"`` (name, file, tokens, base model identity);
each file is copied, content-named, into ``weights/``. Exporting one of the session's own items writes such a
file (per-item finetunes only: the item's adapter is what makes it portable)."""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np

from .items import SessionError, unique_names


class BankItems:
    """The bank-item methods of :class:`~dedit_nb.session.Session` (a mixin: core.py stays the session's own)."""

    @property
    def bank_items(self) -> list[dict]:
        """The imported bank items: ``name``, ``file`` (in the session folder), ``tokens``, ``base``."""
        return copy.deepcopy(self._data.get("bank", []))

    def bank_item(self, name: str):
        """One imported bank item (:class:`dedit_nb.bank.files.BankItem`), read from the session folder."""
        from ..bank import files
        for entry in self._data.get("bank", []):
            if entry["name"] == name:
                return files.read(self.folder / entry["file"])
        raise SessionError(f"the session has no bank item {name!r}; bank items: "
                           f"{[e['name'] for e in self._data.get('bank', [])]} (import one with import_item)")

    def export_item(self, image, item, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write one item as a bank file (its tokens, its adapter, its crop and mask, name, template and the base
        model's identity): the session must be finetuned with ``FinetuneConfig(per_item=True)``. An existing
        file is never replaced unless ``overwrite=True`` and it is a bank file. Returns the path written."""
        from ..bank import files
        from ..models.adapters import split_by_item
        meta = self.weights_meta
        if meta.get("mode") != "per_item" or not (self.finetune_state or {}).get("done"):
            raise SessionError("only an item of a finished per-item finetune can be exported (its own adapter is "
                               "what lets it work in another session): finetune with FinetuneConfig(per_item=True)")
        entry = self.image(image)
        k = entry.item_index(item)
        it = entry.items[k]
        rows = self.load_weights("tokens")
        rows = {key: v for key, v in rows.items() if key.split("/", 1)[1] in it.tokens}
        adapter = split_by_item(self.load_weights("unet"))[it.tokens[0]]
        digest = hashlib.sha256()
        for key in sorted(rows) + sorted(adapter):
            digest.update(key.encode())
            digest.update((rows.get(key, adapter.get(key))).float().numpy().tobytes())
        fresh = [f"<bank.{digest.hexdigest()[:12]}_{t}>" for t in range(len(it.tokens))]
        renamed = {f"{key.split('/', 1)[0]}/{fresh[it.tokens.index(key.split('/', 1)[1])]}": v
                   for key, v in rows.items()}
        ys, xs = np.nonzero(entry.labels == k)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        crop, mask = files.shrink_crop(entry.working[box[1]:box[3], box[0]:box[2]],
                                       entry.labels[box[1]:box[3], box[0]:box[2]] == k)
        bank_item = files.BankItem(it.name, it.template, fresh, renamed, adapter, meta["lora"]["rank"],
                                   meta["lora"]["alpha"], meta["base"], crop, mask,
                                   {"session_id": self.id, "image": entry.name, "item": it.name, "box": list(box),
                                    "image_size": list(entry.size)})
        return files.write(bank_item, path, overwrite=overwrite)

    def import_item(self, path: str | os.PathLike, name: str | None = None, model=None) -> str:
        """Add a bank file to this session's bank items (no training); returns the name it has here (``name``,
        or the item's own, numbered if taken). Refused when the item was made on another base model than this
        session's (its recorded per-item finetune, or ``model`` when given; an edit checks the model too).
        Importing the same file again returns the name it has already."""
        from ..bank import files
        blob = Path(path).read_bytes() if Path(path).is_file() else b""
        item = files.from_bytes(blob, path) if blob else files.read(path)
        check_base(item, model, self.weights_meta.get("base"))
        rel = self._stage("weights/bank", ".safetensors", blob)
        bank = self._data.setdefault("bank", [])
        for entry in bank:
            if entry["file"] == rel:
                self._staged.pop(rel, None)
                return entry["name"]
        taken = [e["name"] for e in bank]
        final = unique_names(taken + [name or item.name])[-1]
        bank.append({"name": final, "file": rel, "tokens": item.tokens, "base": item.base})
        self.save()
        return final


def check_base(item, model=None, recorded: dict | None = None) -> None:
    """Refuse a bank item made on another base model than ``model`` (or the ``recorded`` identity), naming both."""
    from ..models.adapters import model_identity
    ours = model_identity(model) if model is not None else recorded
    if ours is None:
        return
    theirs = item.base
    if (ours["config_sha256"], ours["weights_sha256"]) != (theirs["config_sha256"], theirs["weights_sha256"]):
        raise SessionError(f"bank item {item.name!r} was made on the model {theirs['model_id']!r} (config "
                           f"{theirs['config_sha256']}, weights {theirs['weights_sha256']}), not on "
                           f"{ours['model_id']!r} (config {ours['config_sha256']}, weights {ours['weights_sha256']}): "
                           "its tokens and adapter only work on the model they were learned on; load that model "
                           "(in fp32 or fp16), or export the item from a session finetuned on this one")
