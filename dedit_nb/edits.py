"""D-Edit's edits on a finetuned session: each is a change of prompts and/or masks, then masked sampling.

An :class:`Editor` puts a session's learned tokens and UNet delta into a model; its methods return an
:class:`EditResult` (images, the hard/soft/active regions, the label map used, and a manifest of every
parameter). Edits never change the session's items; each is recorded in the session's history.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import conditioning as C
from . import masks as M
from .bank.use import bank_adapters
from .display import region_legend_handles, region_picture
from .models import DEditModel
from .operations import (ImageOp, MoveOp, ReconOp, RemoveOp, TextOp, flat_operation, mask_png,
                         operation_from_dict, operations_from)
from .parameters import EDIT_KINDS  # noqa: F401 (dedit_nb.edits.EDIT_KINDS: the kinds of edit)
from .plans import plan_edit
from .quality import WeightedScorer, quality_record
from .replay import ReplayError, check_request, read_request, request_record
from .reruns import EDIT_MARKER, choose_folder
from .sampler import SamplingConfig, masked_sample
from .session import Session, SessionError, atomic_write_bytes, npy_bytes, png_bytes


@dataclass
class EditResult:
    """Images of one edit, the regions it used, and its manifest."""

    kind: str
    images: list[np.ndarray]
    original: np.ndarray
    labels: np.ndarray
    regions: M.Regions
    manifest: dict = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)   # operation index -> the pixels it drew

    def save(self, output_dir: str | Path) -> Path:
        """Write ``image_<j>.png``, ``hard.png``/``soft.png``/``active.png``, ``labels.npy``, ``mask_<i>.png``
        for each operation that drew pixels (the request refers to it, so the folder replays on its own) and
        ``manifest.json`` (each file written atomically) into ``output_dir``, replacing an earlier edit there;
        a folder holding other files (the user's) is left alone and the edit goes to the next numbered folder
        (with a warning). Returns the folder written."""
        out, note = choose_folder(output_dir, overwrite=True, marker=EDIT_MARKER, what="an edit")
        if note:
            warnings.warn(note, stacklevel=2)
        earlier = _manifest_images(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"images": []}
        for j, img in enumerate(self.images):
            name = f"image_{j}.png"
            _save_png(out / name, img)
            files["images"].append(name)
        for region in ("hard", "soft", "active"):
            _save_png(out / f"{region}.png", getattr(self.regions, region).astype(np.uint8) * 255)
            files[region] = f"{region}.png"
        atomic_write_bytes(out / "labels.npy", npy_bytes(self.labels.astype(np.int32)))
        files["labels"] = "labels.npy"
        manifest = {"kind": self.kind, **self.manifest, "files": files}
        if "request" in manifest:
            manifest["request"] = copy.deepcopy(manifest["request"])
            files["masks"] = []
            for i, mask in sorted(self.masks.items()):
                name = f"mask_{i}.png"
                _save_png(out / name, mask_png(mask))
                files["masks"].append(name)
                operation = manifest["request"]["operations"][i]
                operation.pop("mask", None)
                operation.update({k: None for k in ("box", "mask_file") if k in operation}, mask_file=name)
        atomic_write_bytes(out / EDIT_MARKER, json.dumps(manifest, indent=2).encode())
        for stale in earlier - set(files["images"]) - set(files.get("masks", [])):
            (out / stale).unlink(missing_ok=True)   # an earlier edit's extra images would read as this one's
        return out

    def figure(self, max_images: int = 4):
        """Original, regions and results side by side (matplotlib figure)."""
        import matplotlib.pyplot as plt
        shown = self.images[:max_images]
        fig, axes = plt.subplots(1, 2 + len(shown), figsize=(3 * (2 + len(shown)), 3))
        axes[0].imshow(self.original, interpolation="nearest")
        axes[0].set_title("original")
        axes[1].imshow(region_picture(self.regions), interpolation="nearest")
        axes[1].set_title("regions")
        fig.legend(handles=region_legend_handles(), loc="lower center", ncol=3, fontsize=8, frameon=False)
        for ax, img, j in zip(axes[2:], shown, range(len(shown))):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(f"{self.kind} #{j}")
        for ax in axes:
            ax.axis("off")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        return fig


def _manifest_images(folder: Path) -> set[str]:
    """The image and mask files an earlier edit's manifest in ``folder`` lists (plain names only)."""
    try:
        files = json.loads((folder / EDIT_MARKER).read_text())["files"]
        names = list(files["images"]) + list(files.get("masks", []))
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"(image|mask)_\d+\.png", n)}


def _save_png(path: Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(arr))


class Editor:
    """Runs edits on a finetuned session.

    Every run puts the session's learned weights into ``model`` (undoing any other session's), so one
    loaded model can serve several editors. :meth:`run` samples any list of operations
    (:mod:`dedit_nb.operations`) in one pass; :meth:`text`, :meth:`move` and the others are one operation
    each. Every edit takes the sampling settings of :class:`SamplingConfig` as keywords (steps, guidance,
    strength, edge_thickness, seed, num_images, eta, scheduler; those left out are the model profile's), and
    diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` with
    ``callback_on_step_end_tensor_inputs``, called after every sampling step: ``pipe`` is a
    :class:`sampler.SamplingRun` (``num_timesteps``, and ``preview()`` for RGB images of the current
    estimate), e.g. for live previews.

    Every manifest holds the full request (``manifest["request"]``, which :meth:`replay` and
    ``python -m dedit_nb.replay`` reproduce) and a ``quality`` record per image
    (:func:`quality.quality_record`); ``metrics_weights`` (e.g. ``{"clip": "path/to/clip"}``, local folders)
    adds the scores that need networks.
    """

    def __init__(self, model: DEditModel, session: Session, progress: bool = True, record: bool = True,
                 metrics_weights: Mapping[str, str | Path] | None = None):
        if not session.has_weights:
            raise SessionError("this session has no learned weights yet; run finetune(model, session) first")
        session.check_model(model)
        state = session.finetune_state or {}
        if not state.get("done", False):
            raise SessionError("this session's finetune did not finish; "
                               "call finetune(model, session) again to resume it")
        self.model, self.session, self.progress, self.record = model, session, progress, record
        self.scorer = WeightedScorer(metrics_weights) if metrics_weights else None
        try:
            model.use_session(session)
        except KeyError as exc:     # names this UNet lacks: the file is not of this session's model
            raise SessionError(f"{session.weights_file('unet')} names UNet parameters this model lacks "
                               f"({exc.args[0]}); restore the session's file, or finetune the session again on "
                               "this model (resume=False)") from exc
        self.item_prompt_length = state.get("config", {}).get("item_prompt_length", C.ITEM_PROMPT_LENGTH)

    # --- the edits -----------------------------------------------------------------------------------
    def run(self, image: int | str = 0, edits: Sequence = ({"kind": "recon"},), priority: Sequence | None = None,
            config: SamplingConfig | None = None, **sampling) -> EditResult:
        """Sample a list of operations (dicts such as ``{"kind": "move", "item": 1, "dx": 4}``, or
        :mod:`dedit_nb.operations` records) on one image in ONE sampling pass (:func:`plans.plan_edit`
        composes them). ``priority`` lists the moved and reshaped items bottom to top. Sampling settings come
        as keywords (those left out: the model profile's) or as a ready ``config``."""
        callbacks = {k: sampling.pop(k) for k in ("callback_on_step_end", "callback_on_step_end_tensor_inputs")
                     if k in sampling}
        if config is None:      # a given profile record means the values were resolved already
            config = SamplingConfig(**sampling) if "profile" in sampling else \
                SamplingConfig.for_model(self.model, **sampling)
        elif sampling:
            raise TypeError(f"give the sampling settings as config or as keywords, not both ({sorted(sampling)})")
        ops = operations_from(edits)
        entry = self.session.image(image)
        plan = plan_edit(entry, self.session, ops, priority, self.item_prompt_length)
        regions = M.edit_regions(plan.active, config.edge_thickness)
        n = len(plan.names)
        areas = M.item_areas(plan.labels, n).astype(float).tolist()
        self.session.check_weights_current()
        self.model.use_session(self.session)
        adapters = self.model.delta.item_adapters   # a per-item session: each prompt's item brings its adapter
        if plan.bank:                                # bank items bring their tokens and adapters for this edit
            adapters = bank_adapters(self.model, self.session, plan.bank)
        cond = C.encode_items(self.model, plan.prompts, plan.lengths, areas, plan.names)
        if adapters is not None:
            cond = replace(cond, slots=adapters.slots_for(plan.prompts), adapters=adapters)
        images = masked_sample(self.model, cond, C.latent_labels(self.model, plan.labels, n), entry.working,
                               regions, config, progress=self.progress, **callbacks)
        kinds = {op.kind for op in ops}
        kind = kinds.pop() if len(kinds) == 1 else "composed"
        manifest = {"kind": kind, "session": str(self.session.folder), "session_id": self.session.id,
                    "image": entry.name, "fit": entry.fit, "model_id": self.model.model_id,
                    "weights_generation": self.session.weights_generation, "params": plan.params,
                    "sampling": asdict(config), "seeds": [config.seed + j for j in range(config.num_images)],
                    "prompts": dict(zip(plan.names, cond.encoded)),
                    "dropped": {name: d for name, d in zip(plan.names, cond.dropped) if d},
                    "region_pixels": {r: int(getattr(regions, r).sum()) for r in ("hard", "soft", "active")},
                    "request": request_record(self.model, self.session, entry.name, ops, priority, config),
                    "quality": [quality_record(entry.working, img, regions, plan.text, self.scorer)
                                for img in images]}
        if self.record:
            self.session.record_edit(manifest)
        return EditResult(kind, images, entry.working, plan.labels, regions, manifest, plan.masks)

    def reconstruct(self, image: int | str = 0, **sampling) -> EditResult:
        """Regenerate the image from its item prompts (a check of the finetune); nothing is frozen."""
        return self.run(image, [ReconOp()], **sampling)

    def text(self, image: int | str, item: int | str, prompt: str, **sampling) -> EditResult:
        """Replace an item's prompt by ``prompt``; a ``*`` in it stands for the item's own tokens, so
        ``"a red *"`` refines the item rather than replacing it."""
        return self.run(image, [TextOp(item, prompt)], **sampling)

    def image(self, image: int | str, item: int | str, source_image: int | str, source_item: int | str,
              template: str | None = None, source_session: Session | None = None, **sampling) -> EditResult:
        """Put an item learned from another image in place of ``item``. The source image is one of this
        session's, or of ``source_session`` when that was finetuned jointly with it (``extra_sessions``).
        ``template`` (e.g. ``"a photo of * in gold"``) adds text around the source item's tokens."""
        return self.run(image, [ImageOp(item, source_image, source_item, template, source_session)], **sampling)

    def move(self, image: int | str, moves: Mapping, priority=None, **sampling) -> EditResult:
        """Move, resize or redraw items: ``moves`` maps an item to ``(dx, dy[, scale])``, a dict of
        :class:`masks.ItemMove` fields, or a boolean mask. ``priority`` lists the moved items bottom to top.
        Uncovered pixels go to the nearest unmoved items."""
        ops = []
        for item, value in moves.items():
            move = _as_move(value)
            ops.append(MoveOp(item, move.dx, move.dy, move.scale, move.mask))
        return self.run(image, ops, priority, **sampling)

    def remove(self, image: int | str, item: int | str, **sampling) -> EditResult:
        """Delete an item; its pixels go to the nearest other items and are regenerated."""
        return self.run(image, [RemoveOp(item)], **sampling)

    def add(self, image: int | str, prompt: str, mask=None, box=None, mask_file=None, name: str = "new item",
            **sampling) -> EditResult:
        """Add a new item with a text prompt over ``mask`` (a boolean array), ``box`` ``[x0, y0, x1, y1]`` or
        ``mask_file`` (.png or .npy); it takes its pixels from the items beneath."""
        return self.run(image, [operation_from_dict({"kind": "add", "name": name, "prompt": prompt, "mask": mask,
                                                     "box": box, "mask_file": mask_file})], **sampling)

    def reshape(self, image: int | str, item: int | str, mask=None, box=None, mask_file=None,
                **sampling) -> EditResult:
        """Give an item a new mask (``mask``, ``box`` or ``mask_file``); the pixels it gives up go to the
        nearest other items, and both are regenerated."""
        return self.run(image, [operation_from_dict({"kind": "reshape", "item": item, "mask": mask, "box": box,
                                                     "mask_file": mask_file})], **sampling)

    def replay(self, manifest_or_folder: Mapping | str | Path, output_dir: str | Path | None = None) -> EditResult:
        """Run a recorded request again (a manifest, or the folder :meth:`EditResult.save` wrote): the same
        images byte for byte on the same model and weights, or a :class:`replay.ReplayError` naming what
        differs (another session, weights generation, model or profile). Saved into ``output_dir`` if given."""
        request, folder = read_request(manifest_or_folder)
        check_request(request, self.model, self.session)
        if output_dir is not None and folder is not None and Path(output_dir).resolve() == folder.resolve():
            raise ReplayError(f"{output_dir} is the edit being replayed: write the replay to another folder")
        ops = operations_from(request["operations"], base_dir=folder)
        result = self.run(request["image"], ops, request["priority"], config=SamplingConfig(**request["sampling"]))
        if output_dir is not None:
            result.save(output_dir)
        return result


def _as_move(value) -> M.ItemMove:
    if isinstance(value, M.ItemMove):
        return value
    if isinstance(value, np.ndarray):
        return M.ItemMove(mask=value)
    if isinstance(value, Mapping):
        return M.ItemMove(**value)
    dx, dy, *rest = value
    return M.ItemMove(dx=dx, dy=dy, scale=rest[0] if rest else 1.0)


def run_edit(editor: Editor, kind: str | None = None, image=0, item=None, prompt=None, dx=0.0, dy=0.0, scale=1.0,
             source_image=None, source_item=None, source_session=None, name=None, box=None, mask_file=None,
             edits: Sequence | None = None, priority: Sequence | None = None, source_item_file=None,
             **sampling) -> EditResult:
    """One edit by name with flat parameters (what papermill and batch runs pass), or, when ``edits`` (a list
    of operation dicts) is given, those operations instead; ``sampling`` holds :class:`SamplingConfig`
    settings (or ``config``) and, optionally, ``callback_on_step_end`` (see :class:`Editor`)."""
    if not edits:
        edits = [flat_operation(kind, item=item, prompt=prompt, dx=dx, dy=dy, scale=scale, source_image=source_image,
                                source_item=source_item, source_session=source_session, name=name, box=box,
                                mask_file=mask_file, source_item_file=source_item_file)]
    return editor.run(image, edits, priority, **sampling)
