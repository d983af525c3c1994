"""Splitting an image into items: every method returns a :class:`Partition` at the image's size.

- ``offline`` (default, no weights): SLIC superpixels merged by colour and adjacency (``offline.py``);
- ``sam``: segment-anything automatic masks turned into a partition, and click/box prompts (``sam.py``);
- ``panoptic``: Mask2Former / OneFormer panoptic segmentation via transformers, with class names
  (``panoptic.py``);
- ``text``: Grounding DINO boxes for a phrase list ("bag. table."), then SAM box prompts (``grounded.py``).

``segment_session`` writes the result into a session; ``overlay_figure`` draws it.
"""
from __future__ import annotations

from .partition import Partition, overlay, overlay_figure, partition_from_masks
from ..parameters import SEGMENTERS as METHODS
from .offline import segment_offline


def segment(image, method: str = "offline", **kwargs) -> Partition:
    """Segment an RGB image (``uint8 (H, W, 3)``) with one of METHODS; keywords go to that method."""
    from ..images import to_rgb_array
    image = to_rgb_array(image)
    if method == "offline":
        return segment_offline(image, **kwargs)
    if method == "sam":
        from .sam import segment_sam
        return segment_sam(image, **kwargs)
    if method == "panoptic":
        from .panoptic import segment_panoptic
        return segment_panoptic(image, **kwargs)
    if method == "grounded":
        from .grounded import segment_grounded
        return segment_grounded(image, **kwargs)
    raise ValueError(f"unknown segmenter {method!r}; choose one of {METHODS}")


def segment_session(session, image=0, method: str = "offline", save: bool = True, **kwargs) -> Partition:
    """Segment a session image at its working size and store the items (validated before anything is
    written, so a failure leaves the session as it was; ``save=False`` leaves the writing to the caller)."""
    entry = session.image(image)
    part = segment(entry.working, method=method, **kwargs)
    session.set_items(image, part.labels, part.item_names, save=save)
    return part


__all__ = ["Partition", "METHODS", "segment", "segment_session", "segment_offline", "partition_from_masks",
           "overlay", "overlay_figure"]
