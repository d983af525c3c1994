"""Panoptic segmentation with transformers (Mask2Former or OneFormer): items come with class names.

``model`` is a hub id such as ``facebook/mask2former-swin-base-coco-panoptic`` or a local folder.
"""
from __future__ import annotations

import numpy as np
import torch

from .partition import Partition, partition_from_masks


def load_panoptic(model: str, device: str | None = None):
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation
    from ..models import pick_device
    try:
        processor = AutoImageProcessor.from_pretrained(model)
        net = AutoModelForUniversalSegmentation.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"cannot load panoptic model {model!r}: {exc}; pass a Mask2Former/OneFormer hub id "
                           f"or folder, or use segmenter='offline'") from exc
    return net.to(pick_device(device)).eval(), processor


@torch.no_grad()
def segment_panoptic(image: np.ndarray, model="facebook/mask2former-swin-base-coco-panoptic", processor=None,
                     threshold: float = 0.5, mask_threshold: float = 0.5, overlap_mask_area_threshold: float = 0.8,
                     min_area_fraction: float = 0.002,
                     background_min_fraction: float = 0.05) -> Partition:
    """Panoptic segments as items named by class ("cup", "dining table 2", ...)."""
    if isinstance(model, str):
        model, processor = load_panoptic(model)
    kwargs = {}
    if "OneFormer" in type(model).__name__:
        kwargs["task_inputs"] = ["panoptic"]
    inputs = processor(images=image, return_tensors="pt", **kwargs).to(model.device)
    outputs = model(**inputs)
    result = processor.post_process_panoptic_segmentation(
        outputs, threshold=threshold, mask_threshold=mask_threshold,
        overlap_mask_area_threshold=overlap_mask_area_threshold, target_sizes=[image.shape[:2]])[0]
    seg = result["segmentation"].cpu().numpy()
    infos = result["segments_info"]
    if not infos:
        return Partition(np.zeros(image.shape[:2], np.int32), ["image"])
    names, counts = [], {}
    for info in infos:
        name = model.config.id2label.get(info["label_id"], f"class{info['label_id']}")
        counts[name] = counts.get(name, 0) + 1
        names.append(name if counts[name] == 1 else f"{name} {counts[name]}")
    masks = [seg == info["id"] for info in infos]
    return partition_from_masks(masks, [info.get("score", 1.0) for info in infos], names,
                                min_area_fraction=min_area_fraction, background_min_fraction=background_min_fraction)
