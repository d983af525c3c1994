"""Mask operations are pure functions that always return a partition."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from dedit_nb import masks as M


def label_maps(max_items=5, max_side=24):
    return st.integers(1, max_items).flatmap(
        lambda k: st.tuples(st.integers(4, max_side), st.integers(4, max_side)).flatmap(
            lambda hw: arrays(np.int32, hw, elements=st.integers(0, k - 1))))


def assert_partition(labels, num_items):
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_items


@settings(max_examples=60, deadline=None)
@given(labels=label_maps(), dx=st.integers(-30, 30), dy=st.integers(-30, 30),
       scale=st.sampled_from([0.5, 1.0, 1.5, 2.0]))
def test_move_keeps_a_partition_and_puts_the_item_where_asked(labels, dx, dy, scale):
    item = int(labels[0, 0])
    n = int(labels.max()) + 1
    moved_mask = M.transform_mask(labels == item, dx, dy, scale)
    if not moved_mask.any():
        with pytest.raises(M.PartitionError, match="leave the image"):
            M.move_items(labels, {item: M.ItemMove(dx, dy, scale)})
        return
    out, active = M.move_items(labels, {item: M.ItemMove(dx, dy, scale)})
    assert_partition(out, n)
    unchanged = ~active
    assert np.array_equal(out[unchanged], labels[unchanged])     # only the active region changed
    if ((labels != item) & ~moved_mask).any():
        # an unmoved item is left to take the uncovered pixels, so the item is exactly its moved mask
        assert np.array_equal(out == item, moved_mask)
    else:
        assert (out == item).all()                               # nothing else is left: it fills the image


def test_move_shifts_centroid_and_refills_from_unmoved_items():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20] = 1
    labels[:, 30:] = 2
    out, active = M.move_items(labels, {1: M.ItemMove(dx=5, dy=8)})
    ys, xs = np.nonzero(out == 1)
    assert (ys.mean(), xs.mean()) == (14.5 + 8, 14.5 + 5)
    assert (out[10:18, 10:15] == 0).all()        # uncovered strip goes to the background, not back to item 1
    assert active.sum() == 100 + int(((labels == 1) & (out != 1)).sum())


def test_priority_decides_which_moved_item_is_on_top():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 1
    labels[2:6, 10:14] = 2
    moves = {1: M.ItemMove(dx=6), 2: M.ItemMove(dx=-2)}       # both land on columns 8..11
    top2, _ = M.move_items(labels, moves, priority=[1, 2])
    top1, _ = M.move_items(labels, moves, priority=[2, 1])
    assert (top2[2:6, 8:12] == 2).all() and (top1[2:6, 8:12] == 1).all()
    with pytest.raises(M.PartitionError, match="priority"):
        M.move_items(labels, moves, priority=[1])


def test_resize_scales_area_about_centroid():
    labels = np.zeros((64, 64), np.int32)
    labels[24:40, 24:40] = 1
    out, _ = M.move_items(labels, {1: M.ItemMove(scale=2.0)})
    assert abs((out == 1).sum() - 4 * 256) <= 64
    ys, xs = np.nonzero(out == 1)
    assert abs(ys.mean() - 31.5) < 1 and abs(xs.mean() - 31.5) < 1


@settings(max_examples=60, deadline=None)
@given(labels=label_maps())
def test_remove_leaves_no_pixel_to_the_item(labels):
    item = int(labels[-1, -1])
    n = int(labels.max()) + 1
    if (labels == item).all():
        with pytest.raises(M.PartitionError, match="whole image"):
            M.remove_item(labels, item)
        return
    out, freed = M.remove_item(labels, item)
    assert_partition(out, n)
    assert not (out == item).any()
    assert np.array_equal(freed, labels == item)
    assert np.array_equal(out[~freed], labels[~freed])


def test_refill_goes_to_the_nearest_item():
    labels = np.array([[0, 0, -1, -1, 1]], np.int32)
    assert M.fill_unassigned(labels).tolist() == [[0, 0, 0, 1, 1]]


def test_explicit_mask_edit():
    labels = np.zeros((10, 10), np.int32)
    labels[:5] = 1
    new = np.zeros((10, 10), bool)
    new[:, :3] = True
    out, active = M.replace_item_mask(labels, 1, new)
    assert np.array_equal(out == 1, new)
    assert (out[:5, 3:] == 0).all()


def test_masks_to_labels_names_overlaps_and_holes():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[1:3] = True
    with pytest.raises(M.PartitionError, match="4 pixels are in several items and 4 pixels in none"):
        M.labels_from_masks([a, b])
    with pytest.raises(M.PartitionError, match="works at 5x4"):
        M.labels_from_masks([a, ~a], shape=(4, 5))
    with pytest.raises(M.PartitionError, match="empty"):
        M.labels_from_masks([np.ones((4, 4), bool), np.zeros((4, 4), bool)])
    assert M.labels_from_masks([a, ~a]).tolist() == (~a).astype(int).tolist()


def test_check_labels_rejects_bad_maps():
    with pytest.raises(M.PartitionError, match="outside 0..1"):
        M.check_labels(np.array([[0, 2]]), 2)
    with pytest.raises(M.PartitionError, match="resize it"):
        M.check_labels(np.zeros((3, 3), int), 1, shape=(4, 4))
    with pytest.raises(M.PartitionError, match="integer"):
        M.check_labels(np.zeros((3, 3), float), 1)


@settings(max_examples=40, deadline=None)
@given(active=arrays(bool, (16, 20)), thickness=st.integers(0, 6))
def test_regions_partition_the_image(active, thickness):
    r = M.edit_regions(active, thickness)
    total = r.hard.astype(int) + r.soft + r.active
    assert (total == 1).all()
    if active.any() and thickness:
        from scipy import ndimage as ndi
        d = ndi.distance_transform_edt(~active)
        assert np.array_equal(r.soft, (d > 0) & (d <= thickness))


def test_split_merge_and_fragments():
    labels = np.zeros((10, 10), np.int32)
    labels[1:3, 1:3] = 1
    labels[6:9, 6:9] = 1
    labels[5, 0] = 2
    out, added = M.split_components(labels, 1)
    assert added == 1 and (out[1:3, 1:3] == 3).all() and (out[6:9, 6:9] == 1).all()
    merged = M.merge_items(out, [1, 3])
    assert np.array_equal(merged == 1, labels == 1)
    cleaned = M.drop_fragments(labels, min_area=5)
    assert (cleaned[1:3, 1:3] == 0).all()        # item 1's small piece went to its surroundings
    assert (cleaned[6:9, 6:9] == 1).all()
    assert cleaned[5, 0] == 2                     # item 2 has only a small piece: it keeps it


def test_majority_downsample_and_resize():
    labels = np.zeros((4, 4), np.int32)
    labels[:, 1:] = 1
    assert M.downsample_labels_majority(labels, 2, 2).tolist() == [[0, 1], [0, 1]]  # 2-2 tie: lowest index
    assert M.downsample_labels_majority(labels, 4, 2).tolist() == [[1]]
    assert M.resize_labels(labels, (8, 8)).shape == (8, 8)
    assert set(np.unique(M.resize_labels(labels, (2, 2)))) <= {0, 1}
