"""Every edit holds the hard region while sampling and keeps its pixels identical; edits are reproducible."""
import json

import numpy as np
import pytest
import torch

from dedit_nb import masks as M
from dedit_nb import sampler
from dedit_nb.edits import Editor, run_edit
from dedit_nb.images import rgb_to_tensor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model
from dedit_nb.sampler import latent_regions
from dedit_nb.session import Session, SessionError
from conftest import finetune_stopping_at, three_item_labels

SAMPLING = dict(steps=3, guidance=3.0, strength=0.5, edge_thickness=2)


@pytest.fixture
def finetuned(tmp_path, photo, tiny_model):
    model = tiny_model
    s = Session.create(tmp_path / "s", photo, resolution=48, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    s.add_image(photo[::-1].copy(), name="flipped")
    finetune(model, s, FinetuneConfig(num_tokens=2, stage1_steps=1, stage2_steps=1), progress=False)
    return model, s


EDITS = {
    "text": lambda ed, **kw: ed.text(0, "left", "a red bag", **SAMPLING, **kw),
    "refine": lambda ed, **kw: ed.text(0, "right", "a photo of * in gold", **SAMPLING, **kw),
    "image": lambda ed, **kw: ed.image(0, "top", "flipped", 0, **SAMPLING, **kw),
    "image+text": lambda ed, **kw: ed.image(0, "top", "flipped", 0, template="a shiny *", **SAMPLING, **kw),
    "move": lambda ed, **kw: ed.move(0, {"top": (4, 6)}, **SAMPLING, **kw),
    "resize": lambda ed, **kw: ed.move(0, {"right": M.ItemMove(scale=0.5)}, **SAMPLING, **kw),
    "move-two": lambda ed, **kw: ed.move(0, {"top": (0, 3), "left": (2, 0)}, priority=["left", "top"], **SAMPLING,
                                         **kw),
    "remove": lambda ed, **kw: ed.remove(0, "top", **SAMPLING, **kw),
    "add": lambda ed, **kw: ed.add(0, "a red hat", box=[2, 2, 12, 10], name="hat", **SAMPLING, **kw),
    "reshape": lambda ed, **kw: ed.reshape(0, "top", box=[0, 0, 24, 12], **SAMPLING, **kw),
    "composed": lambda ed, **kw: ed.run(0, [{"kind": "move", "item": "top", "dx": 2, "dy": 1},
                                            {"kind": "add", "name": "hat", "prompt": "a red hat",
                                             "box": [40, 30, 60, 44]}], **SAMPLING, **kw),
}


def test_every_edit_holds_the_hard_region_in_latents_and_keeps_its_pixels_exactly(finetuned):
    model, s = finetuned
    editor = Editor(model, s, progress=False)
    original = s.images[0].working
    clean = model.encode_images(rgb_to_tensor(original))[0]
    for name, run in EDITS.items():
        seen = []
        result = run(editor, callback_on_step_end=lambda pipe, i, t, kw: seen.append((i, kw["latents"].clone())) or kw)
        r = result.regions
        assert ((r.hard.astype(int) + r.soft + r.active) == 1).all(), name
        assert r.hard.any() and r.active.any(), name
        assert [i for i, _ in seen] == list(range(SAMPLING["steps"])), name
        hard, soft = latent_regions(model, r)
        final = seen[-1][1][0]
        assert torch.equal(final[:, hard], clean[:, hard]), name    # held while sampling, not only pasted back
        assert not (final[:, ~(hard | soft)] == clean[:, ~(hard | soft)]).any(), name
        for img in result.images:
            assert img.shape == original.shape and img.dtype == np.uint8
            assert np.array_equal(img[r.hard], original[r.hard]), name
        assert [q["preserved_pixels_changed"] for q in result.manifest["quality"]] == [0], name
        assert M.check_labels(result.labels, len(result.manifest["prompts"])) is not None
    assert [h["kind"] for h in Session.open(s.folder).history] == \
        ["text", "text", "image", "image", "move", "move", "move", "remove", "add", "reshape", "composed"]


def test_run_edit_passes_the_step_hook_and_scheduler_through(finetuned):
    model, s = finetuned
    editor = Editor(model, s, progress=False, record=False)
    for kind, extra in [("recon", {}), ("text", {"item": 0, "prompt": "a red bag"}), ("move", {"item": 2, "dx": 3}),
                        ("remove", {"item": 2}), ("image", {"item": 2, "source_image": 1, "source_item": 0})]:
        seen = []
        result = run_edit(editor, kind, **extra, steps=3, guidance=2.0, scheduler="euler",
                          callback_on_step_end=lambda pipe, i, t, kw: seen.append((i, pipe.num_timesteps)) or kw)
        assert seen == [(0, 3), (1, 3), (2, 3)], kind
        assert [q["preserved_pixels_changed"] for q in result.manifest["quality"]] == [0], kind
        assert result.manifest["sampling"]["scheduler"] == "euler" and "callback_on_step_end" not in \
            result.manifest["sampling"]


def test_the_quality_record_sees_preserved_pixels_change_without_the_final_composite(finetuned, monkeypatch,
                                                                                    tmp_path):
    model, s = finetuned
    editor = Editor(model, s, progress=False, record=False)
    result = editor.remove(0, "top", **SAMPLING)
    saved = json.loads((result.save(tmp_path / "out") / "manifest.json").read_text())
    assert saved["quality"] == json.loads(json.dumps(result.manifest["quality"]))
    assert saved["quality"][0]["preserved_pixels_changed"] == 0 and saved["quality"][0]["mse_preserved"] == 0
    monkeypatch.setattr(sampler, "paste_hard_region", lambda images, original, hard: images)
    for name in ("text", "image", "move", "remove"):
        record = EDITS[name](editor).manifest["quality"][0]
        if model.vae is None:   # pixel space: the latent blend alone holds the preserved pixels exactly
            assert record["preserved_pixels_changed"] == 0, (name, record)
        else:                   # the VAE's round trip shows, and the record says so
            assert record["preserved_pixels_changed"] > 0 and record["mse_preserved"] > 0, (name, record)


def test_recon_and_num_images(finetuned):
    model, s = finetuned
    result = Editor(model, s, progress=False).reconstruct(0, num_images=2, **SAMPLING)
    assert len(result.images) == 2 and not np.array_equal(result.images[0], result.images[1])
    assert result.regions.active.all() and result.manifest["seeds"] == [0, 1]


def test_mask_edits_change_the_labels_as_asked(finetuned):
    model, s = finetuned
    editor = Editor(model, s, progress=False)
    labels = s.images[0].labels
    removed = editor.remove(0, "top", **SAMPLING)
    assert not (removed.labels == 2).any()
    assert np.array_equal(removed.regions.active, labels == 2)
    moved = editor.move(0, {"top": (4, 6)}, **SAMPLING)
    assert np.array_equal(moved.labels == 2, M.transform_mask(labels == 2, 4, 6))
    assert (moved.regions.active >= ((moved.labels == 2) | (labels == 2))).all()


@pytest.mark.parametrize("family", ["sd"])
def test_moved_items_stack_by_the_priority_asked_for_not_the_order_of_the_moves(finetuned):
    model, s = finetuned
    editor = Editor(model, s, progress=False, record=False)
    labels = s.images[0].labels
    w = labels.shape[1]
    moves = {"left": (w // 4, 0), "right": (-(w // 4), 0)}       # both land on the middle columns
    overlap = M.transform_mask(labels == 0, w // 4, 0) & M.transform_mask(labels == 1, -(w // 4), 0)
    assert overlap.sum() > 100
    for priority, on_top in ((["right", "left"], 0), (["left", "right"], 1)):
        result = editor.move(0, moves, priority=priority, steps=1, guidance=1.0)
        assert (result.labels[overlap] == on_top).all(), priority
        assert result.manifest["params"]["priority"] == priority
        expected, _ = M.move_items(labels, {0: M.ItemMove(dx=w // 4), 1: M.ItemMove(dx=-(w // 4))},
                                   [s.images[0].item_index(k) for k in priority])
        assert np.array_equal(result.labels, expected)
    unordered = editor.move(0, moves, steps=1, guidance=1.0)      # no priority: the order of the moves
    assert (unordered.labels[overlap] == 1).all() and unordered.manifest["params"]["priority"] == ["left", "right"]


@pytest.mark.parametrize("family", ["sd"])
def test_an_image_edit_regenerates_the_target_item_with_the_source_items_prompt(finetuned):
    """Target item 1 ('right') takes item 0 of the other image: item 1's pixels change, not item 0's."""
    model, s = finetuned
    editor = Editor(model, s, progress=False, record=False)
    entry, source = s.images[0], s.images[1]
    original = entry.working
    by_method = editor.image(0, "right", "flipped", 0, **SAMPLING)
    by_name = run_edit(editor, "image", item="right", source_image="flipped", source_item=0, **SAMPLING)
    for result in (by_method, by_name):
        r = result.regions
        assert np.array_equal(r.active, entry.labels == 1)
        assert result.manifest["prompts"] == {"left": entry.items[0].prompt(), "right": source.items[0].prompt(),
                                              "top": entry.items[2].prompt()}
        assert result.manifest["params"]["item_index"] == 1 and result.manifest["params"]["source_item_index"] == 0
        image = result.images[0]
        assert np.array_equal(image[r.hard], original[r.hard]) and (r.hard & (entry.labels == 0)).any()
        assert not np.array_equal(image[r.active], original[r.active])
    assert np.array_equal(by_method.images[0], by_name.images[0])


def test_same_seed_after_reopening_gives_identical_output(finetuned, tiny_model_dirs, family, tmp_path):
    model, s = finetuned
    first = Editor(model, s, progress=False).text(0, "left", "a red bag", seed=7, **{**SAMPLING})
    again_model = load_model(str(tiny_model_dirs[family]))
    again = Editor(again_model, Session.open(s.folder), progress=False).text(0, "left", "a red bag", seed=7, **SAMPLING)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, again.images))
    other = Editor(again_model, Session.open(s.folder), progress=False).text(0, "left", "a red bag", seed=8, **SAMPLING)
    assert not np.array_equal(first.images[0], other.images[0])
    out = first.save(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "text" and manifest["params"]["prompt"] == "a red bag"
    assert manifest["sampling"]["seed"] == 7 and manifest["model_id"] == model.model_id
    assert {"hard", "soft", "active", "images", "labels"} <= set(manifest["files"])


def test_bad_edit_input_is_refused_without_touching_the_session(finetuned):
    model, s = finetuned
    before = (s.folder / "session.json").read_bytes()
    editor = Editor(model, s, progress=False, record=False)
    with pytest.raises(SessionError, match="has no item 'chair'"):
        editor.text(0, "chair", "a red chair")
    with pytest.raises(SessionError, match="items 0..2"):
        editor.remove(0, 7)
    with pytest.raises(M.PartitionError, match="leave the image"):
        editor.move(0, {"top": (10_000, 0)})
    with pytest.raises(ValueError, match="needs a prompt"):
        editor.text(0, "left", " ")
    with pytest.raises(TypeError):
        editor.reconstruct(0, stepz=3)
    with pytest.raises(ValueError, match="unknown edit"):
        run_edit(editor, "recolour", item=0)
    assert (s.folder / "session.json").read_bytes() == before


def test_session_finetuned_on_another_model_is_refused(finetuned, tiny_model_dirs, family):
    model, s = finetuned
    other_family = "sdxl" if family != "sdxl" else "sd"
    other = load_model(str(tiny_model_dirs[other_family]))
    with pytest.raises(SessionError, match="finetuned on"):
        Editor(other, s)
    with pytest.raises(SessionError, match="finetuned on"):
        finetune(other, s, FinetuneConfig(num_tokens=2, stage1_steps=1, stage2_steps=1), progress=False)


def test_missing_weights_file_is_a_clear_error(finetuned):
    model, s = finetuned
    for f in (s.folder / "weights").glob("unet-*"):
        f.unlink()
    with pytest.raises(SessionError, match="is missing"):
        Editor(model, Session.open(s.folder))


def test_unfinished_finetune_cannot_edit(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = Session.create(tmp_path / "s", photo, resolution=32, multiple=8)
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=2, stage2_steps=2), progress=False,
             callback=finetune_stopping_at("stage1", 0))
    with pytest.raises(SessionError, match="did not finish"):
        Editor(model, s)


def test_item_from_a_jointly_finetuned_session(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    a = Session.create(tmp_path / "a", photo, resolution=32, multiple=8)
    b = Session.create(tmp_path / "b", photo[::-1].copy(), resolution=32, multiple=8)
    c = Session.create(tmp_path / "c", photo, resolution=32, multiple=8)
    h, w = a.images[0].labels.shape
    for s in (a, b):
        s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    finetune(model, a, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), extra_sessions=[b], progress=False)
    assert Session.open(tmp_path / "b").has_weights
    editor = Editor(model, a, progress=False)
    result = editor.image(0, "top", 0, "left", source_session=Session.open(tmp_path / "b"), **SAMPLING)
    assert result.manifest["prompts"]["top"] == b.images[0].items[0].prompt()
    assert np.array_equal(result.images[0][result.regions.hard], a.images[0].working[result.regions.hard])
    with pytest.raises(SessionError, match="not finetuned jointly"):
        editor.image(0, "top", 0, 0, source_session=c, **SAMPLING)
    b_alone = Session.open(tmp_path / "b")          # b finetuned again on its own: new tokens a never saw
    finetune(model, b_alone, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1, seed=1), resume=False,
             progress=False)
    with pytest.raises(SessionError, match="finetuned again since its joint finetune"):
        Editor(model, a, progress=False).image(0, "top", 0, "left", source_session=Session.open(tmp_path / "b"),
                                               **SAMPLING)


def test_an_editor_refuses_weights_that_another_finetune_replaced(finetuned):
    model, s = finetuned
    editor = Editor(model, Session.open(s.folder), progress=False)
    first = editor.reconstruct(0, **SAMPLING)
    assert first.manifest["weights_generation"] == s.weights_generation is not None
    rerun = Session.open(s.folder)                   # 02 run again (another kernel) while the editor is open
    finetune(model, rerun, FinetuneConfig(num_tokens=2, stage1_steps=1, stage2_steps=1, seed=1), resume=False,
             progress=False)
    with pytest.raises(SessionError, match="were replaced"):
        editor.reconstruct(0, **SAMPLING)           # not an edit with the old weights, recorded as the new ones'
    assert [r["weights_generation"] for r in Session.open(s.folder).history] == [s.weights_generation]
    fresh = Editor(model, Session.open(s.folder), progress=False).reconstruct(0, **SAMPLING)
    assert fresh.manifest["weights_generation"] == rerun.weights_generation != s.weights_generation


def test_text_edit_regenerates_the_item_from_the_prompt_reaching_the_encoder(finetuned):
    model, s = finetuned
    editor = Editor(model, s, progress=False, record=False)
    entry = s.images[0]
    replaced = editor.text(0, "left", "a red bag", **SAMPLING)
    assert np.array_equal(replaced.regions.active, entry.labels == 0)
    refined = editor.text(0, "right", "a photo of * in gold", **SAMPLING)
    assert np.array_equal(refined.regions.active, entry.labels == 1)
    tokens = entry.items[1].prompt()
    assert refined.manifest["prompts"]["right"] == f"a photo of {tokens} in gold"
    assert replaced.manifest["prompts"] == {"left": "a red bag", "right": tokens, "top": entry.items[2].prompt()}


def test_sampling_runs_with_the_sessions_learned_weights_in_place(finetuned):
    model, s = finetuned
    learned = s.load_weights("unet")
    assert learned
    editor = Editor(model, s, progress=False, record=False)
    in_place = []

    def check(pipe, step, timestep, callback_kwargs):
        params = dict(model.unet.named_parameters())
        in_place.append(all(torch.equal(params[n], v.to(params[n])) for n, v in learned.items()))
        return callback_kwargs

    editor.reconstruct(0, callback_on_step_end=check, **SAMPLING)
    assert in_place == [True] * SAMPLING["steps"]
