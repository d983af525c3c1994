"""The bank file: one item, learned once, as one safetensors file.

Tensors: ``token/{encoder}/{k}`` (fp32 embedding rows of the item's tokens, one per text encoder),
``adapter/{layer}.{projection}.lora_A|B`` (the item's per-item LoRA, fp16), ``crop`` (uint8 ``(h, w, 3)``: the
item's bounding box in its image, its longer side at most :data:`CROP_SIDE` pixels) and ``mask`` (uint8 0/1 at
the crop's size). Metadata (strings): the format, the item's name and template, its token names, the
adapter's rank and alpha, the base model's identity (:func:`dedit_nb.models.adapters.model_identity`) and
where the item came from. Reading never unpickles (safetensors only) and checks every part; writing is
atomic and never replaces a file that is not a bank file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..masks import resize_labels
from ..session.store import atomic_write_bytes

FORMAT = "dedit-bank-item"
VERSION = "1"
CROP_SIDE = 256          # a crop's longer side, at most (it is for showing the item; the adapter is the item)
SUFFIX = ".safetensors"
TOKEN = re.compile(r"<bank\.[0-9a-f]{12}_\d+>")


class BankFileError(ValueError):
    """A bank file that cannot be read or used, with the fix."""


@dataclass
class BankItem:
    """One banked item: what a session needs to put it into any image without training."""

    name: str
    template: str
    tokens: list[str]
    rows: dict[str, torch.Tensor]          # "{encoder}/{token}" -> fp32 row, as TextConditioner.set_token_rows
    adapter: dict[str, torch.Tensor]       # "{layer}.{projection}.lora_A|B" -> tensor
    rank: int
    alpha: float
    base: dict[str, str]                   # the model identity it was made on
    crop: np.ndarray                       # uint8 (h, w, 3)
    mask: np.ndarray                       # bool (h, w)
    source: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The item's adapter key (its first token), as per-item routing names items."""
        return self.tokens[0]

    def prompt(self, template: str | None = None) -> str:
        tpl = template if template is not None else self.template
        return tpl.replace("*", " ".join(self.tokens)) if "*" in tpl else tpl


def shrink_crop(crop: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The crop and its mask with the longer side at most :data:`CROP_SIDE` (area-averaged colours, nearest
    mask)."""
    h, w = mask.shape
    factor = max(h, w) / CROP_SIDE
    if factor <= 1:
        return crop, mask
    from PIL import Image
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.BOX))
    return small, resize_labels(mask.astype(np.int32), (size[1], size[0])).astype(bool)


def to_bytes(item: BankItem) -> bytes:
    from safetensors.torch import save
    tensors = {f"token/{key.split('/', 1)[0]}/{item.tokens.index(key.split('/', 1)[1])}": row.float().contiguous()
               for key, row in item.rows.items()}
    tensors |= {f"adapter/{n}": v.detach().to("cpu", torch.float16).contiguous() for n, v in item.adapter.items()}
    tensors["crop"] = torch.tensor(np.asarray(item.crop, dtype=np.uint8))
    tensors["mask"] = torch.tensor(np.asarray(item.mask, dtype=np.uint8))
    meta = {"format": FORMAT, "version": VERSION, "name": item.name, "template": item.template,
            "tokens": json.dumps(item.tokens), "rank": str(item.rank), "alpha": repr(float(item.alpha)),
            "base": json.dumps(item.base, sort_keys=True), "source": json.dumps(item.source)}
    return save(tensors, metadata=meta)


def write(item: BankItem, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``item`` to ``path`` (``.safetensors`` added when missing), atomically. An existing file is
    replaced only with ``overwrite=True`` and only when it is a bank file itself (never a link, never a file of
    another kind)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    if path.is_symlink() or path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; choose another file name, or pass overwrite=True to replace "
                                  "a bank file there")
        if path.is_symlink() or not path.is_file():
            raise FileExistsError(f"{path} is a link or not a file; it is left alone: choose another file name")
        read(path)   # raises (and so leaves the file alone) unless it is a bank file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, to_bytes(item))
    return path


def _fail(path, what: str, fix: str = "export the item again (session.export_item)") -> BankFileError:
    return BankFileError(f"{path}: {what}; {fix}")


def read(path: str | os.PathLike) -> BankItem:
    """A bank file, read safely (safetensors, no pickle) and checked; :class:`BankFileError` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise BankFileError(f"{path} is not a file; give the path of a bank item (.safetensors) that "
                            "session.export_item or `python -m dedit_nb.bank export` wrote")
    return from_bytes(path.read_bytes(), path)


def from_bytes(blob: bytes, path) -> BankItem:
    """A bank item from a file's bytes (``path`` names it in errors)."""
    import struct

    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8:8 + length]).get("__metadata__") or {}
        tensors = load(blob)
    except (SafetensorError, struct.error, ValueError, AttributeError) as exc:
        raise _fail(path, f"is not a readable safetensors file ({exc})") from exc
    return from_parts(path, meta, tensors)


def from_parts(path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> BankItem:
    """A bank item from a file's metadata and tensors, every part checked."""
    if meta.get("format") != FORMAT:
        raise _fail(path, f"is not a bank item (its metadata format is {meta.get('format')!r}, not {FORMAT!r})",
                    "give a file that session.export_item wrote")
    if meta.get("version") != VERSION:
        raise _fail(path, f"is bank format version {meta.get('version')!r}; this version reads {VERSION!r}",
                    "export it again with this version")
    try:
        tokens = json.loads(meta["tokens"])
        base = json.loads(meta["base"])
        source = json.loads(meta.get("source", "{}"))
        rank, alpha, name, template = int(meta["rank"]), float(meta["alpha"]), meta["name"], meta["template"]
    except (KeyError, ValueError, TypeError) as exc:
        raise _fail(path, f"has damaged metadata ({exc!r})") from exc
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and TOKEN.fullmatch(t) for t in tokens)):
        raise _fail(path, "lists no valid token names")
    if not (isinstance(base, dict) and all(isinstance(base.get(k), str)
                                           for k in ("model_id", "config_sha256", "weights_sha256"))):
        raise _fail(path, "has no base-model identity")
    if not name.strip() or rank < 1 or not math.isfinite(alpha) or not isinstance(source, dict):
        raise _fail(path, "has an empty name, a rank below 1 or a non-finite alpha")
    rows, adapter = {}, {}
    for key, value in tensors.items():
        if not torch.is_floating_point(value) and key.startswith(("token/", "adapter/")):
            raise _fail(path, f"holds {key} as {value.dtype}, not floating point")
        if key.startswith("token/"):
            _, encoder, k = key.split("/")
            if not k.isdigit() or int(k) >= len(tokens):
                raise _fail(path, f"holds a token row {key} past its {len(tokens)} tokens")
            rows[f"{encoder}/{tokens[int(k)]}"] = value.float()
        elif key.startswith("adapter/"):
            adapter[key[len("adapter/"):]] = value
        elif key not in ("crop", "mask"):
            raise _fail(path, f"holds an unknown tensor {key!r}")
    broken = [k for k, v in {**rows, **adapter}.items() if not torch.isfinite(v).all()]
    if broken:
        raise _fail(path, f"holds NaN or infinite values ({broken[0]})")
    if not rows or len(rows) % len(tokens) or not adapter:
        raise _fail(path, "lacks its token rows or its adapter")
    crop, mask = tensors.get("crop"), tensors.get("mask")
    if (crop is None or mask is None or crop.dtype != torch.uint8 or crop.ndim != 3 or crop.shape[2] != 3
            or tuple(mask.shape) != tuple(crop.shape[:2])):
        raise _fail(path, "lacks its crop (uint8 h x w x 3) or its mask of the same size")
    return BankItem(name, template, tokens, rows, adapter, rank, alpha, base, crop.numpy(), mask.numpy() > 0,
                    source)


def file_size(model, num_tokens: int = 5, rank: int = 4, crop_side: int = CROP_SIDE) -> int:
    """The bytes of a bank file of one item of ``model`` with a ``crop_side``-square crop: only shapes are read,
    so a model on the meta device (:func:`dedit_nb.memory.configs.model_from_configs`) gives the real size."""
    from ..attention import cross_attention_layers
    from ..models.adapters import PROJECTIONS, _linear
    tokens = [f"<bank.{0:012x}_{t}>" for t in range(num_tokens)]
    rows = {f"{s}/{t}": torch.zeros(slot.embedding().weight.shape[1]) for s, slot in enumerate(model.conditioner.slots)
            for t in tokens}
    adapter = {}
    for name, module in cross_attention_layers(model.unet):
        for proj in PROJECTIONS:
            linear = _linear(getattr(module, proj))
            adapter[f"{name}.{proj}.lora_A"] = torch.zeros(rank, linear.in_features)
            adapter[f"{name}.{proj}.lora_B"] = torch.zeros(linear.out_features, rank)
    base = {"model_id": str(model.model_id), "config_sha256": "0" * 16, "weights_sha256": "0" * 16}
    item = BankItem("item", "a photo of *", tokens, rows, adapter, rank, float(rank), base,
                    np.zeros((crop_side, crop_side, 3), np.uint8), np.zeros((crop_side, crop_side), bool))
    return len(to_bytes(item))
