"""Edit requests: operations checked by their schemas, composed into one plan, sampled in one pass, replayed."""
import json
import shutil

import numpy as np
import pytest

from dedit_nb import masks as M
from dedit_nb.edits import Editor, run_edit
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model
from dedit_nb.operations import operation_from_dict, operations_from
from dedit_nb.parameters import OPERATIONS, SAMPLING, ParameterError
from dedit_nb.plans import plan_edit
from dedit_nb.replay import ReplayError, main as replay_main
from dedit_nb.sampler import SamplingConfig
from dedit_nb.session import Session
from conftest import three_item_labels

FAST = dict(steps=2, guidance=2.0, strength=0.5, edge_thickness=2)


def planned_session(tmp_path, photo):
    """A session whose items have tokens (enough to plan; no model, no weights)."""
    s = Session.create(tmp_path / "plan", photo, resolution=32, multiple=8)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"], save=False)
    s.assign_tokens(1)
    return s


def box_mask(shape, x0, y0, x1, y1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def plan(s, edits, priority=None):
    return plan_edit(s.images[0], s, operations_from(edits), priority)


def composed_edits(shape):
    h, w = shape
    return [{"kind": "move", "item": "top", "dx": 3, "dy": 2},
            {"kind": "text", "item": "right", "prompt": "a photo of * in gold"},
            {"kind": "remove", "item": "left"},
            {"kind": "add", "name": "hat", "prompt": "a red hat", "mask": box_mask(shape, 2, h - 8, 8, h - 2)}]


def test_a_composed_plan_stays_a_partition_and_holds_what_each_operation_changes(tmp_path, photo):
    s = planned_session(tmp_path, photo)
    entry = s.images[0]
    edits = composed_edits(entry.labels.shape)
    whole = plan(s, edits)
    assert M.check_labels(whole.labels, 4) is not None                     # a partition of 3 items + the hat
    assert whole.names == ["left", "right", "top", "hat"]
    assert not (whole.active < (whole.labels != entry.labels)).any()        # every changed pixel is active
    for i, op in enumerate(edits):
        alone = plan(s, [op])
        assert not (alone.active & ~whole.active).any(), op["kind"]         # each op's change is in the union
    assert np.array_equal(whole.labels == 3, edits[3]["mask"])             # the hat on top, where drawn
    assert not (whole.labels == 0).any()                                    # left removed
    assert whole.prompts[1] == f"a photo of {entry.items[1].prompt()} in gold"
    assert whole.prompts[3] == "a red hat" and whole.prompts[0] == entry.items[0].prompt()


def test_removed_pixels_go_to_kept_items_and_moves_stack_by_priority(tmp_path, photo):
    s = planned_session(tmp_path, photo)
    labels = s.images[0].labels
    removed = plan(s, [{"kind": "remove", "item": "top"}, {"kind": "move", "item": "left", "dx": 4}])
    freed = (labels == 2) & ~M.transform_mask(labels == 0, 4, 0)
    assert (removed.labels[freed] == 1).all()            # refilled from the kept item, not the moved one
    w = labels.shape[1]
    moves = [{"kind": "move", "item": "left", "dx": w // 4}, {"kind": "move", "item": "right", "dx": -(w // 4)}]
    overlap = M.transform_mask(labels == 0, w // 4, 0) & M.transform_mask(labels == 1, -(w // 4), 0)
    assert overlap.any()
    for priority, on_top in ((["right", "left"], 0), (["left", "right"], 1)):
        assert (plan(s, moves + [{"kind": "remove", "item": "top"}], priority).labels[overlap] == on_top).all()


def test_add_takes_its_pixels_from_the_items_beneath_and_reshape_gives_an_item_its_new_mask(tmp_path, photo):
    s = planned_session(tmp_path, photo)
    labels = s.images[0].labels
    hat = box_mask(labels.shape, 10, 4, 20, 14)
    added = plan(s, [{"kind": "add", "name": "top", "prompt": "a red hat", "mask": hat}])
    assert np.array_equal(added.labels == 3, hat) and np.array_equal(added.labels[~hat], labels[~hat])
    assert np.array_equal(added.active, hat) and added.names[3] == "top-2"    # names stay unique
    new = box_mask(labels.shape, 0, 0, 12, 12)
    reshaped = plan(s, [{"kind": "reshape", "item": "right", "mask": new}])
    assert np.array_equal(reshaped.labels == 1, new)
    given_up = (labels == 1) & ~new
    assert not (reshaped.labels[given_up] == 1).any() and reshaped.active[given_up].all()
    assert np.array_equal(reshaped.active, new | given_up)


def test_operations_that_change_nothing_add_nothing_to_a_plan(tmp_path, photo):
    s = planned_session(tmp_path, photo)
    entry = s.images[0]
    text = {"kind": "text", "item": "left", "prompt": "a red bag"}
    alone = plan(s, [text])
    noops = [{"kind": "move", "item": "top", "dx": 0}, {"kind": "text", "item": "right", "prompt": "*"},
             {"kind": "reshape", "item": "top", "mask": entry.labels == 2},
             {"kind": "image", "item": "top", "source_image": 0, "source_item": "top"}]
    for noop in noops:
        with_noop = plan(s, [noop, text])
        assert np.array_equal(with_noop.active, alone.active) and with_noop.prompts == alone.prompts, noop
        assert with_noop.lengths == alone.lengths and np.array_equal(with_noop.labels, alone.labels), noop
    with pytest.raises(ParameterError, match="change nothing"):
        plan(s, noops)


@pytest.mark.parametrize("data, name, message", [
    ({"kind": "recolour"}, "kind", "unknown edit 'recolour'"),
    ({"kind": "move", "item": 1, "scal": 2}, "scal", "did you mean 'scale'"),
    ({"kind": "move", "item": 1, "dx": "4"}, "dx", "should be a number, got '4'"),
    ({"kind": "move", "item": 1, "scale": 0}, "scale", "should be a number > 0, got 0"),
    ({"kind": "text", "item": 1}, "prompt", "the text operation needs prompt"),
    ({"kind": "remove"}, "item", "the remove operation needs item"),
    ({"kind": "add", "prompt": "a hat"}, "mask", "one of mask (a boolean array), box"),
    ({"kind": "add", "prompt": "a hat", "box": [0, 0, 4, 4], "mask_file": "m.png"}, "mask", "one way"),
    ({"kind": "reshape", "item": 0, "box": [0, 0, 4]}, "box", "a box [x0, y0, x1, y1]"),
    ({"kind": "image", "item": 0, "source_item": 1, "source_image": -1}, "source_image", ">= 0"),
])
def test_operation_errors_name_the_field_the_value_and_the_fix(data, name, message):
    with pytest.raises(ParameterError) as err:
        operation_from_dict(data)
    assert err.value.name == name and message in str(err.value)


def test_sampling_and_plan_errors_name_the_field(tmp_path, photo):
    for settings, name in ((dict(steps=0), "steps"), (dict(edge_thickness=-1), "edge_thickness"),
                           (dict(edge_thickness=2.5), "edge_thickness"), (dict(scheduler="dpm"), "scheduler")):
        with pytest.raises(ParameterError) as err:
            SamplingConfig(**settings)
        assert err.value.name == name and str(err.value).startswith(f"SamplingConfig.{name}: ")
    with pytest.raises(ParameterError, match="FinetuneConfig.num_tokens: should be an integer >= 1, got 0"):
        FinetuneConfig(num_tokens=0)
    s = planned_session(tmp_path, photo)
    with pytest.raises(ParameterError, match=r"parameter 'box': \[0, 0, 999, 4\] is not a box inside"):
        plan(s, [{"kind": "add", "prompt": "a hat", "box": [0, 0, 999, 4]}])
    with pytest.raises(ParameterError, match="'priority': .* must list exactly the moved and reshaped items"):
        plan(s, [{"kind": "move", "item": 0, "dx": 2}], priority=["right"])
    with pytest.raises(ParameterError, match="operation 1: should be an item index or name, got 1.5"):
        operations_from([{"kind": "recon"}, {"kind": "move", "item": 1.5}])
    assert [f.name for f in SAMPLING if f.profile] == ["steps", "guidance", "strength", "edge_thickness"]
    assert {f.widget for f in OPERATIONS["move"]} >= {"item", "slider", "mask"}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dirs):
    from skimage import data
    model = load_model(str(tiny_model_dirs["sd"]))
    folder = tmp_path_factory.mktemp("compose")
    s = Session.create(folder / "s", data.coffee(), resolution=32, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    return model, s, tiny_model_dirs["sd"]


def test_a_composed_edit_keeps_every_pixel_outside_its_regions_and_records_one_request(finetuned):
    model, s, _ = finetuned
    editor = Editor(model, Session.open(s.folder), progress=False)
    before = len(editor.session.edit_requests())
    entry = s.images[0]
    h, w = entry.labels.shape
    edits = [{"kind": "move", "item": "top", "dx": 2, "dy": 1}, {"kind": "text", "item": "left", "prompt": "a red *"},
             {"kind": "add", "name": "hat", "prompt": "a red hat", "box": [w - 10, h - 8, w - 2, h - 2]}]
    result = editor.run(0, edits, **FAST)
    r = result.regions
    assert r.hard.any() and r.active.any() and ((r.hard.astype(int) + r.soft + r.active) == 1).all()
    assert np.array_equal(result.images[0][r.hard], entry.working[r.hard])
    assert not np.array_equal(result.images[0][r.active], entry.working[r.active])
    assert result.kind == "composed" and result.manifest["quality"][0]["preserved_pixels_changed"] == 0
    assert result.manifest["prompts"]["hat"] == "a red hat"
    requests = Session.open(s.folder).edit_requests()
    assert len(requests) == before + 1
    assert requests[-1]["operations"] == [{"kind": "move", "item": "top", "dx": 2, "dy": 1, "scale": 1.0, "mask": None,
                                           "mask_file": None}, {**edits[1]}, {**edits[2], "mask": None, "mask_file": None}]


def test_an_operation_composed_with_no_ops_samples_the_same_images(finetuned):
    model, s, _ = finetuned
    editor = Editor(model, s, progress=False, record=False)
    labels = s.images[0].labels
    text = {"kind": "text", "item": "left", "prompt": "a red bag"}
    alone = editor.run(0, [text], seed=3, **FAST)
    with_noops = run_edit(editor, edits=[{"kind": "move", "item": "top", "dx": 0}, text,
                                         {"kind": "reshape", "item": "right", "mask": labels == 1},
                                         {"kind": "text", "item": "top", "prompt": "*"}], seed=3, **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(alone.images, with_noops.images))
    assert with_noops.kind == "composed" and alone.kind == "text"


def test_add_and_reshape_through_the_editor(finetuned, tmp_path):
    model, s, _ = finetuned
    editor = Editor(model, s, progress=False, record=False)
    entry = s.images[0]
    h, w = entry.labels.shape
    np.save(tmp_path / "hat.npy", box_mask((h, w), 4, 4, 14, 12))
    added = editor.add(0, "a red hat", mask_file=str(tmp_path / "hat.npy"), name="hat", **FAST)
    assert np.array_equal(added.labels == 3, np.load(tmp_path / "hat.npy"))
    assert added.manifest["params"]["name"] == "hat" and added.manifest["prompts"]["hat"] == "a red hat"
    assert np.array_equal(added.images[0][added.regions.hard], entry.working[added.regions.hard])
    reshaped = editor.reshape(0, "top", box=[0, 0, w // 2, h // 4], **FAST)
    assert np.array_equal(reshaped.labels == 2, box_mask((h, w), 0, 0, w // 2, h // 4))
    assert reshaped.kind == "reshape" and np.array_equal(reshaped.images[0][reshaped.regions.hard],
                                                         entry.working[reshaped.regions.hard])


def test_a_saved_edit_replays_byte_for_byte_or_is_refused_naming_what_differs(finetuned, tmp_path, capsys):
    model, s, model_dir = finetuned
    editor = Editor(model, s, progress=False, record=False)
    h, w = s.images[0].labels.shape
    edits = [{"kind": "move", "item": "top", "dx": 2, "dy": 1},
             {"kind": "add", "prompt": "a red hat", "mask": box_mask((h, w), 2, 2, 9, 9)}]
    first = editor.run(0, edits, num_images=2, scheduler="euler-ancestral", seed=5, **FAST).save(tmp_path / "a")
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["request"]["operations"][1]["mask_file"] == "mask_1.png" and (first / "mask_1.png").is_file()
    again = editor.replay(first, output_dir=tmp_path / "b")
    assert again.manifest["request"]["operations"][1]["mask_file"] == str(first / "mask_1.png")
    assert replay_main([str(first), "--output", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.count("identical") == 2
    for name in ("image_0.png", "image_1.png", "labels.npy", "mask_1.png"):
        for copy in ("b", "c"):
            assert (tmp_path / copy / name).read_bytes() == (first / name).read_bytes(), (name, copy)
    with pytest.raises(ReplayError, match="model 'other'"):
        editor.replay({**manifest, "request": {**manifest["request"], "model_id": "other"}})
    with pytest.raises(ReplayError, match="is the edit being replayed"):
        editor.replay(first, output_dir=first)
    with pytest.raises(ReplayError, match="holds no request"):
        editor.replay({k: v for k, v in manifest.items() if k != "request"})
    moved = tmp_path / "moved-session"
    shutil.copytree(s.folder, moved)
    elsewhere = {**manifest, "request": {**manifest["request"], "session": str(tmp_path / "gone")}}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(elsewhere))
    assert replay_main([str(tmp_path / "d"), "--output", str(tmp_path / "e")]) == 2
    assert "session" in capsys.readouterr().err and not (tmp_path / "e").exists()
    retrained = Session.open(moved)
    finetune(model, retrained, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1, seed=1), resume=False,
             progress=False)
    assert replay_main([str(first), "--output", str(tmp_path / "f"), "--session", str(moved)]) == 2
    assert "generation" in capsys.readouterr().err and not (tmp_path / "f").exists()
