"""segment-anything: automatic masks turned into a partition, and click/box prompts for the editor.

Checkpoints are the official ``.pth`` files (vit_b ``sam_vit_b_01ec64.pth``, vit_l ``sam_vit_l_0b3195.pth``,
vit_h ``sam_vit_h_4b8939.pth``), downloaded by the user from the segment-anything repository's README.
They are read with ``torch.load(weights_only=True)``: tensors only, never pickled code.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .partition import Partition, partition_from_masks

SAM_TYPES = ("vit_b", "vit_l", "vit_h")


class SamLoadError(RuntimeError):
    """A SAM checkpoint that is missing, unreadable or of another model type."""


def build_sam(model_type: str = "vit_b"):
    """An untrained SAM of a given type: segment-anything's ``sam_model_registry`` builder, given no checkpoint
    (the weights are loaded by :func:`load_sam`, tensors only). ``"tiny"`` is a small random-weight SAM for
    tests."""
    from segment_anything import sam_model_registry
    if model_type == "tiny":
        return _build_tiny_sam()
    if model_type not in SAM_TYPES:
        raise SamLoadError(f"unknown SAM model type {model_type!r}; use one of {SAM_TYPES} (or 'tiny' for tests)")
    return sam_model_registry[model_type](checkpoint=None).eval()


def _build_tiny_sam():
    """SAM's modules at toy sizes (64 px input, 32-dim embeddings): what the tests run in seconds."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    dim, size, patch = 32, 64, 16
    return Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=dim, img_size=size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                      patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,),
                                      window_size=2, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def load_sam(checkpoint: str | Path, model_type: str | None = None, device: str | None = None):
    """Load a SAM ``.pth`` checkpoint (model type guessed from the file name when not given)."""
    path = Path(checkpoint)
    if not path.exists():
        raise SamLoadError(
            f"SAM checkpoint {path} does not exist; download sam_vit_b_01ec64.pth (or vit_l / vit_h) from the "
            f"segment-anything README and pass its path, or use segmenter='offline'")
    if model_type is None:
        model_type = next((t for t in SAM_TYPES if t in path.name), None)
        if model_type is None:
            raise SamLoadError(f"cannot tell the SAM type from {path.name!r}; pass model_type='vit_b'/'vit_l'/'vit_h'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SamLoadError(f"cannot read SAM checkpoint {path}: {exc}; download it again") from exc
    if not isinstance(state, dict):
        raise SamLoadError(f"{path} holds no state dict of tensors; is it a SAM checkpoint?")
    sam = build_sam(model_type)
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        raise SamLoadError(f"{path} does not fit SAM {model_type}: {str(exc).splitlines()[0]}; "
                           f"check model_type") from exc
    from ..models import pick_device
    return sam.to(pick_device(device))


def _sam(sam_or_path, model_type=None):
    return load_sam(sam_or_path, model_type) if isinstance(sam_or_path, (str, Path)) else sam_or_path


def segment_sam(image: np.ndarray, sam=None, checkpoint: str | Path | None = None, model_type: str | None = None,
                points_per_side: int = 32, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                min_area_fraction: float = 0.002, background_min_fraction: float = 0.05,
                max_items: int | None = 24) -> Partition:
    """SAM's automatic masks as a partition (the rule of ``partition_from_masks``): overlaps go to the
    higher-scoring mask (score = predicted IoU x stability), a large uncovered area becomes a background
    item, small fragments join their neighbours; at most ``max_items`` masks, the highest-scoring kept."""
    from segment_anything import SamAutomaticMaskGenerator
    if sam is None and checkpoint is None:
        raise SamLoadError("segmenter 'sam' needs a checkpoint path (or a loaded sam model)")
    model = _sam(sam if sam is not None else checkpoint, model_type)
    generator = SamAutomaticMaskGenerator(model, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                          stability_score_thresh=stability_score_thresh)
    records = generator.generate(np.ascontiguousarray(image))
    records.sort(key=lambda r: -r["predicted_iou"] * r["stability_score"])
    if max_items is not None:
        records = records[:max_items]
    if not records:
        return Partition(np.zeros(image.shape[:2], np.int32), ["image"])
    masks = [r["segmentation"] for r in records]
    scores = [r["predicted_iou"] * r["stability_score"] for r in records]
    return partition_from_masks(masks, scores, [f"segment{k}" for k in range(len(masks))],
                                min_area_fraction=min_area_fraction, background_min_fraction=background_min_fraction)


@dataclass(frozen=True)
class SamClicks:
    """A mask being built from clicks, held by whoever collects them (the mask editor): the clicks (pixels
    of the image), their labels (1 inside the object, 0 outside) and the low-resolution logits of the mask
    they gave, which go back into SAM as ``mask_input`` when a click is added, so the mask is refined rather
    than redone (as ``SamPredictor``'s callers do). ``SamClicks()`` starts a new mask."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    logits: np.ndarray | None = None


class SamPrompter:
    """Click and box prompts on one image, used the way ``SamPredictor`` is meant to be: the image is embedded
    once; a single click asks for SAM's three candidate masks and keeps the best scored one (one click is
    ambiguous), several clicks or a box ask for one mask. It keeps no prompts between calls: a caller
    refining a mask click by click passes the clicks so far (:meth:`add_click`) or the previous logits
    (``mask_input``).

    ``predict(points=[(x, y), ...], point_labels=[1, 0, ...], box=(x0, y0, x1, y1))`` returns a boolean mask;
    ``boxes([...])`` returns one mask per box from a single batched call. Coordinates are pixels of the image.
    """

    def __init__(self, sam, image: np.ndarray):
        from segment_anything import SamPredictor
        self.predictor = SamPredictor(_sam(sam))  # a loaded model or a checkpoint path
        self.predictor.set_image(np.ascontiguousarray(image))
        self.shape = image.shape[:2]

    def predict(self, points: Sequence[tuple[float, float]] | None = None, point_labels: Sequence[int] | None = None,
                box: Sequence[float] | None = None, mask_input: np.ndarray | None = None) -> np.ndarray:
        """The mask of these prompts; ``mask_input``: the low-resolution logits of an earlier mask to refine."""
        return self._predict(points, point_labels, box, mask_input)[0]

    def add_click(self, clicks: SamClicks, point: tuple[float, float], positive: bool = True
                  ) -> tuple[np.ndarray, SamClicks]:
        """The mask after one more click, refined from the mask of ``clicks``, and the clicks with it."""
        points, labels = (*clicks.points, tuple(map(float, point))), (*clicks.labels, int(positive))
        mask, logits = self._predict(points, labels, None, clicks.logits)
        return mask, SamClicks(points, labels, logits)

    def _predict(self, points, point_labels, box, mask_input) -> tuple[np.ndarray, np.ndarray]:
        if not points and box is None:
            raise ValueError("give at least one click (points) or a box")
        points = [tuple(map(float, p)) for p in points or []]
        labels = [int(v) for v in (point_labels if point_labels is not None else [1] * len(points))]
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} clicks but {len(labels)} point_labels; give one label per click")
        masks, scores, logits = self.predictor.predict(
            point_coords=np.asarray(points, np.float32) if points else None,
            point_labels=np.asarray(labels, np.int32) if points else None,
            box=None if box is None else np.asarray(box, np.float32),
            mask_input=mask_input, multimask_output=box is None and len(points) == 1)
        best = int(np.argmax(scores))
        return masks[best].astype(bool), logits[best][None]

    def boxes(self, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """One mask per box, all boxes in one ``predict_torch`` call (used by text-prompted segmentation)."""
        if len(boxes) == 0:
            return []
        device = self.predictor.device
        scaled = self.predictor.transform.apply_boxes_torch(torch.as_tensor(np.asarray(boxes, np.float32),
                                                                            device=device), self.shape)
        masks, _, _ = self.predictor.predict_torch(None, None, boxes=scaled, multimask_output=False)
        return [m[0].cpu().numpy().astype(bool) for m in masks]
