"""D-Edit's edits on a finetuned session: each is a change of prompts and/or masks, then masked sampling.

An :class:`Editor` puts a session's learned tokens and UNet delta into a model; its methods return an
:class:`EditResult` (images, the hard/soft/active regions, the label map used, and a manifest of every
parameter). Edits never change the session's items; each is recorded in the session's history.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from . import conditioning as C
from . import masks as M
from .display import region_legend_handles, region_picture
from .quality import WeightedScorer, quality_record
from .reruns import EDIT_MARKER, choose_folder
from .sampler import SamplingConfig, masked_sample
from .session import Session, SessionError, atomic_write_bytes, npy_bytes, png_bytes

EDIT_KINDS = ("recon", "text", "image", "move", "remove")


@dataclass
class EditResult:
    """Images of one edit, the regions it used, and its manifest."""

    kind: str
    images: list[np.ndarray]
    original: np.ndarray
    labels: np.ndarray
    regions: M.Regions
    manifest: dict = field(default_factory=dict)

    def save(self, output_dir: str | Path) -> Path:
        """Write ``image_<j>.png``, ``hard.png``/``soft.png``/``active.png``, ``labels.npy`` and
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
        atomic_write_bytes(out / EDIT_MARKER, json.dumps(manifest, indent=2).encode())
        for stale in earlier - set(files["images"]):
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
    """The image files an earlier edit's manifest in ``folder`` lists (plain names only)."""
    try:
        names = json.loads((folder / EDIT_MARKER).read_text())["files"]["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"image_\d+\.png", n)}


def _save_png(path: Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(arr))


def _as_move(value) -> M.ItemMove:
    if isinstance(value, M.ItemMove):
        return value
    if isinstance(value, np.ndarray):
        return M.ItemMove(mask=value)
    if isinstance(value, Mapping):
        return M.ItemMove(**value)
    dx, dy, *rest = value
    return M.ItemMove(dx=dx, dy=dy, scale=rest[0] if rest else 1.0)


class Editor:
    """Runs edits on a finetuned session.

    Every run puts the session's learned weights into ``model`` (undoing any other session's), so one
    loaded model can serve several editors. Every edit method takes the sampling settings of
    :class:`SamplingConfig` as keywords (steps, guidance, strength, edge_thickness, seed, num_images, eta,
    scheduler), and ``callback_on_step_end``: a function called after every sampling step with a
    :class:`sampler.SamplingStep` (step index, number of steps, timestep, latents, and ``preview()`` for
    RGB images of the current estimate), e.g. for live previews.

    Every manifest holds a ``quality`` record per image (:func:`quality.quality_record`); ``metrics_weights``
    (e.g. ``{"clip": "path/to/clip"}``, local folders) adds the scores that need networks.
    """

    def __init__(self, model, session: Session, progress: bool = True, record: bool = True,
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
    def reconstruct(self, image: int | str = 0, **sampling) -> EditResult:
        """Regenerate the image from its item prompts (a check of the finetune); nothing is frozen."""
        entry = self.session.image(image)
        prompts = [it.prompt() for it in entry.items]
        active = np.ones(entry.labels.shape, bool)
        return self._run("recon", image, prompts, [self.item_prompt_length] * len(prompts), entry.labels,
                         active, sampling, {})

    def text(self, image: int | str, item: int | str, prompt: str, **sampling) -> EditResult:
        """Replace an item's prompt by ``prompt``; a ``*`` in it stands for the item's own tokens, so
        ``"a red *"`` refines the item rather than replacing it."""
        if not prompt or not prompt.strip():
            raise ValueError("a text edit needs a prompt, e.g. 'a red bag' or 'a photo of * in gold'")
        entry = self.session.image(image)
        k = entry.item_index(item)
        self._require_pixels(entry, k)
        prompts = [it.prompt() for it in entry.items]
        lengths = [self.item_prompt_length] * len(prompts)
        prompts[k] = entry.items[k].prompt(prompt) if "*" in prompt else prompt
        lengths[k] = C.TEXT_PROMPT_LENGTH
        return self._run("text", image, prompts, lengths, entry.labels, entry.labels == k, sampling,
                         {"item": entry.items[k].name, "item_index": k, "prompt": prompt})

    def image(self, image: int | str, item: int | str, source_image: int | str, source_item: int | str,
              template: str | None = None, source_session: Session | None = None, **sampling) -> EditResult:
        """Put an item learned from another image in place of ``item``. The source image is one of this
        session's, or of ``source_session`` when that was finetuned jointly with it (``extra_sessions``).
        ``template`` (e.g. ``"a photo of * in gold"``) adds text around the source item's tokens."""
        entry = self.session.image(image)
        owner = self.session if source_session is None else source_session
        self.session.check_joint(owner)
        source = owner.image(source_image)
        k = entry.item_index(item)
        sk = source.item_index(source_item)
        self._require_pixels(entry, k)
        prompts = [it.prompt() for it in entry.items]
        lengths = [self.item_prompt_length] * len(prompts)
        prompts[k] = source.items[sk].prompt(template)
        if template:
            lengths[k] = C.TEXT_PROMPT_LENGTH
        return self._run("image", image, prompts, lengths, entry.labels, entry.labels == k, sampling,
                         {"item": entry.items[k].name, "item_index": k, "source_image": source.name,
                          "source_session": str(source_session.folder) if source_session is not None else None,
                          "source_item": source.items[sk].name, "source_item_index": sk, "template": template})

    def move(self, image: int | str, moves: Mapping, priority=None, **sampling) -> EditResult:
        """Move, resize or redraw items: ``moves`` maps an item to ``(dx, dy[, scale])``, a dict of
        :class:`masks.ItemMove` fields, or a boolean mask. ``priority`` lists the moved items bottom to top.
        Uncovered pixels go to the nearest unmoved items."""
        entry = self.session.image(image)
        resolved = {entry.item_index(k): _as_move(v) for k, v in moves.items()}
        order = [entry.item_index(k) for k in priority] if priority is not None else None
        labels, active = M.move_items(entry.labels, resolved, order)
        prompts = [it.prompt() for it in entry.items]
        params = {"moves": {entry.items[k].name: {"dx": m.dx, "dy": m.dy, "scale": m.scale,
                                                   "mask": m.mask is not None} for k, m in resolved.items()},
                  "priority": [entry.items[k].name for k in (order or resolved)]}
        return self._run("move", image, prompts, [self.item_prompt_length] * len(prompts), labels, active,
                         sampling, params)

    def remove(self, image: int | str, item: int | str, **sampling) -> EditResult:
        """Delete an item; its pixels go to the nearest other items and are regenerated."""
        entry = self.session.image(image)
        k = entry.item_index(item)
        labels, freed = M.remove_item(entry.labels, k)
        prompts = [it.prompt() for it in entry.items]
        return self._run("remove", image, prompts, [self.item_prompt_length] * len(prompts), labels, freed,
                         sampling, {"item": entry.items[k].name, "item_index": k})

    # --- machinery -----------------------------------------------------------------------------------
    @staticmethod
    def _require_pixels(entry, k: int) -> None:
        if not (entry.labels == k).any():
            raise M.PartitionError(f"item {entry.items[k].name!r} has no pixels in image {entry.name!r}")

    def _run(self, kind, image, prompts, lengths, labels, active, sampling: dict, params: dict) -> EditResult:
        sampling = dict(sampling)
        callback_on_step_end = sampling.pop("callback_on_step_end", None)
        config = SamplingConfig(**sampling)
        entry = self.session.image(image)
        if kind == "recon":
            regions = M.Regions(hard=np.zeros_like(active), soft=np.zeros_like(active), active=active)
        else:
            regions = M.edit_regions(active, config.edge_thickness)
        n = len(entry.items)
        areas = M.item_areas(labels, n).astype(float).tolist()
        self.session.check_weights_current()
        self.model.use_session(self.session)
        cond = C.encode_items(self.model, prompts, lengths, areas, [it.name for it in entry.items])
        adapters = self.model.delta.item_adapters   # a per-item session: each prompt's item brings its adapter
        if adapters is not None:
            cond = replace(cond, slots=adapters.slots_for(prompts), adapters=adapters)
        images = masked_sample(self.model, cond, C.latent_labels(self.model, labels, n), entry.working,
                               regions, config, progress=self.progress, callback_on_step_end=callback_on_step_end)
        manifest = {"kind": kind, "session": str(self.session.folder), "session_id": self.session.id,
                    "image": entry.name, "fit": entry.fit, "model_id": self.model.model_id,
                    "weights_generation": self.session.weights_generation, "params": params,
                    "sampling": asdict(config), "seeds": [config.seed + j for j in range(config.num_images)],
                    "prompts": {it.name: p for it, p in zip(entry.items, cond.encoded)},
                    "dropped": {it.name: d for it, d in zip(entry.items, cond.dropped) if d},
                    "region_pixels": {r: int(getattr(regions, r).sum()) for r in ("hard", "soft", "active")},
                    "quality": [quality_record(entry.working, img, regions, params.get("prompt") or
                                               params.get("template"), self.scorer) for img in images]}
        if self.record:
            self.session.record_edit(manifest)
        return EditResult(kind, images, entry.working, labels, regions, manifest)


def run_edit(editor: Editor, kind: str, image=0, item=None, prompt=None, dx=0.0, dy=0.0, scale=1.0,
             source_image=None, source_item=None, source_session=None, **sampling) -> EditResult:
    """One edit by name, with flat parameters (what papermill and batch runs pass); ``sampling`` holds
    :class:`SamplingConfig` settings and, optionally, ``callback_on_step_end`` (see :class:`Editor`)."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit {kind!r}; choose one of {EDIT_KINDS}")
    if kind != "recon" and item is None:
        raise ValueError(f"the {kind} edit needs an item (index or name)")
    if kind == "recon":
        return editor.reconstruct(image, **sampling)
    if kind == "text":
        return editor.text(image, item, prompt, **sampling)
    if kind == "image":
        if source_image is None or source_item is None:
            raise ValueError("the image edit needs source_image and source_item")
        return editor.image(image, item, source_image, source_item, template=prompt, source_session=source_session,
                            **sampling)
    if kind == "move":
        return editor.move(image, {item: M.ItemMove(dx=dx, dy=dy, scale=scale)}, **sampling)
    return editor.remove(image, item, **sampling)
