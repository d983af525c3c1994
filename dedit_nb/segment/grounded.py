"""Text-prompted items: Grounding DINO finds boxes for phrases ("bag. table."), SAM turns boxes into masks.

``detector`` is a hub id such as ``IDEA-Research/grounding-dino-tiny`` or a local folder. When nothing is
detected the documented fallback applies: one item covers the whole image (with a warning).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .partition import Partition, partition_from_masks
from .sam import SamLoadError, SamPrompter, _sam


def load_detector(model: str, device: str | None = None):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    from ..models import pick_device
    try:
        processor = AutoProcessor.from_pretrained(model)
        net = AutoModelForZeroShotObjectDetection.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"cannot load detector {model!r}: {exc}; pass a Grounding DINO hub id or folder") from exc
    return net.to(pick_device(device)).eval(), processor


def phrases_of(text: str) -> list[str]:
    """"bag. red table." -> ["bag", "red table"]"""
    return [p.strip() for p in text.replace(",", ".").split(".") if p.strip()]


def _match(label: str, phrases: list[str]) -> str:
    label = label.replace("[SEP]", "").strip()
    for p in phrases:
        if p.lower() in label.lower():
            return p
    return label or "object"


@torch.no_grad()
def segment_grounded(image: np.ndarray, phrases: str, sam=None, checkpoint=None, model_type: str | None = None,
                     detector="IDEA-Research/grounding-dino-tiny", processor=None, box_threshold: float = 0.35,
                     text_threshold: float = 0.25, max_items: int = 16, min_area_fraction: float = 0.002,
                     background_min_fraction: float = 0.05) -> Partition:
    """Items for ``phrases`` ('bag. table.'), found by Grounding DINO and cut out by SAM; everything not found
    becomes a background item."""
    wanted = phrases_of(phrases)
    if not wanted:
        raise ValueError("text-prompted segmentation needs phrases, e.g. 'bag. table.'")
    if sam is None and checkpoint is None:
        raise SamLoadError("text-prompted segmentation needs SAM for the masks: pass checkpoint='sam_vit_b_01ec64.pth'")
    if isinstance(detector, str):
        detector, processor = load_detector(detector)
    query = ". ".join(wanted) + "."
    inputs = processor(images=image, text=query, return_tensors="pt").to(detector.device)
    outputs = detector(**inputs)
    found = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
        target_sizes=[image.shape[:2]])[0]
    boxes = found["boxes"].cpu().numpy()
    if len(boxes) == 0:
        warnings.warn(f"nothing detected for {wanted}: one item covers the image", stacklevel=2)
        return Partition(np.zeros(image.shape[:2], np.int32), ["image"])
    scores = found["scores"].cpu().numpy()
    order = np.argsort(-scores)[:max_items]
    labels = found.get("text_labels", found.get("labels"))
    prompter = sam if isinstance(sam, SamPrompter) else SamPrompter(_sam(sam if sam is not None else checkpoint,
                                                                         model_type), image)
    masks = prompter.boxes([boxes[i] for i in order])
    names, counts = [], {}
    for i in order:
        name = _match(str(labels[i]), wanted)
        counts[name] = counts.get(name, 0) + 1
        names.append(name if counts[name] == 1 else f"{name} {counts[name]}")
    return partition_from_masks(masks, [float(scores[i]) for i in order], names,
                                min_area_fraction=min_area_fraction, background_min_fraction=background_min_fraction)
