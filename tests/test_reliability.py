"""Hostile-tester cases (issue 27): nothing outside what the project wrote is touched, non-finite numbers
are refused, interrupts and deleted folders leave consistent sessions, inputs that would hang are refused."""
import importlib
import json
import os
import warnings

import numpy as np
import pytest

from dedit_nb.session import Session, SessionError
from conftest import three_item_labels


def _session(folder, photo=None):
    image = photo if photo is not None else np.full((64, 96, 3), 120, np.uint8)
    return Session.create(folder, image, resolution=64, multiple=8,
                          labels=three_item_labels(*image.shape[:2]), item_names=["a", "b", "c"])


# --- 1: garbage collection only of the session's own files ---------------------------------------------
def test_saves_delete_only_files_the_session_wrote_never_through_a_linked_folder(tmp_path):
    users = tmp_path / "my-weights"
    users.mkdir()
    (users / "my-notes.txt").write_text("mine")
    (users / "other-project.safetensors").write_bytes(b"theirs")
    s = _session(tmp_path / "s")
    (tmp_path / "s" / "weights").symlink_to(users)
    images = tmp_path / "s" / "images"
    (images / "holiday-001.jpg").write_bytes(b"a photo")
    (images / "album").mkdir()
    (images / "album" / "x.jpg").write_bytes(b"x")
    first_labels = tmp_path / "s" / json.loads((tmp_path / "s" / "session.json").read_text())["images"][0]["labels"]
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        s.rename_item(0, 0, "renamed")                   # a save that leaves an old label map unreferenced
        s.set_items(0, three_item_labels(64, 96)[::-1].copy(), ["a", "b", "c"])
        s.record_edit({"kind": "test"})
    assert (users / "my-notes.txt").read_text() == "mine"
    assert (users / "other-project.safetensors").read_bytes() == b"theirs"
    assert (images / "holiday-001.jpg").read_bytes() == b"a photo" and (images / "album" / "x.jpg").exists()
    assert not first_labels.exists()                     # the session's own unused files still go
    said = [str(w.message) for w in told]
    assert sum("holiday-001.jpg" in m for m in said) == 1 and sum("is a link" in m for m in said) == 1
    assert len(Session.open(tmp_path / "s").history) == 1


def test_copy_to_skips_a_link_to_nothing_and_a_failed_copy_leaves_no_folder(tmp_path):
    s = _session(tmp_path / "s")
    (tmp_path / "s" / "images" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    copy = s.copy_to(tmp_path / "copy")
    assert not (tmp_path / "copy" / "images" / "gone.jpg").exists() and copy.images[0].size == (96, 64)
    working = tmp_path / "s" / s.images[0].working_file
    working.rename(tmp_path / "moved.png")
    working.symlink_to(tmp_path / "moved-away.png")       # a file the session needs is a link to nothing
    with pytest.raises(SessionError, match="working image"):
        s.copy_to(tmp_path / "copy2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "moved.png", "s"]


# --- 4: non-finite numbers --------------------------------------------------------------------------------
def _digest(folder):
    import hashlib
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".session.lock"}


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("notebook, name, value", [
    ("02_finetune", "stage1_lr", NAN), ("02_finetune", "stage2_lr", INF), ("02_finetune", "recon_guidance", INF),
    ("03_edit", "guidance", INF), ("03_edit", "strength", NAN), ("03_edit", "dx", -INF), ("03_edit", "scale", INF),
    ("03_edit", "seed", 2**64), ("02_finetune", "seed", 2**32)])
def test_notebook_checks_refuse_non_finite_numbers_and_seeds_out_of_range(notebook, name, value):
    from dedit_nb.notebook import NOTEBOOK_PARAMETERS, ParameterError, check_values
    with pytest.raises(ParameterError, match=f"parameter '{name}'"):
        check_values(NOTEBOOK_PARAMETERS[notebook], {name: value})


@pytest.mark.parametrize("settings", [dict(guidance=INF), dict(guidance=NAN), dict(eta=NAN), dict(strength=NAN),
                                      dict(seed=2**64), dict(seed=2**64 - 1, num_images=2)])
def test_sampling_config_refuses_non_finite_numbers_and_seeds_torch_cannot_take(settings):
    from dedit_nb.sampler import SamplingConfig
    with pytest.raises(ValueError, match="finite|SamplingConfig.seed: should be"):
        SamplingConfig(**settings)
    assert SamplingConfig(seed=2**64 - 1).seed == 2**64 - 1        # the largest seed is accepted


@pytest.mark.parametrize("settings", [dict(stage1_lr=NAN), dict(stage2_lr=INF), dict(lora_lr=-INF),
                                      dict(seed=2**32), dict(seed=-1)])
def test_finetune_config_refuses_non_finite_rates_and_seeds_out_of_range(settings):
    from dedit_nb.finetune import FinetuneConfig
    with pytest.raises(ValueError, match=f"FinetuneConfig.{next(iter(settings))}"):
        FinetuneConfig(**settings)


def test_a_session_change_holding_nan_is_not_saved(tmp_path):
    s = _session(tmp_path / "s")
    before = _digest(tmp_path / "s")
    with pytest.raises(SessionError, match="NaN or infinite"):
        s.record_edit({"kind": "text", "sampling": {"guidance": NAN}})
    assert _digest(tmp_path / "s") == before


def test_non_finite_learned_weights_are_refused_on_load_naming_the_file(tmp_path):
    import torch
    s = _session(tmp_path / "s")
    state = {"config": {}, "model_id": "m", "stage": 2, "step": 1, "done": True, "loss": {}}
    s.save_weights({"tokens": {"t/0": torch.zeros(2, 4)}, "unet": {"a.attn2.to_k.weight": torch.full((3, 3), NAN)}},
                   "m", {"mode": "attn", "num_tokens": 1, "joint": [{"id": s.id, "folder": str(s.folder)}]}, state)
    opened = Session.open(tmp_path / "s")
    assert opened.load_weights("tokens")["t/0"].shape == (2, 4)
    with pytest.raises(SessionError, match=r"unet-[0-9a-f]+\.safetensors \(the learned unet weights\) holds NaN"):
        opened.load_weights("unet")


def test_steps_beyond_the_schedulers_timesteps_are_refused_by_name(tiny_model_dirs):
    from dedit_nb.models import load_model
    from dedit_nb.sampler import SamplingConfig, masked_sample
    from sampler_cases import reference_case
    model = load_model(str(tiny_model_dirs["sd"]))
    cond, labels, original, regions, _ = reference_case(model)
    with pytest.raises(ValueError, match=r"steps=1000 is more than .* use steps <= 999"):
        masked_sample(model, cond, labels, original, regions, SamplingConfig(steps=1000), progress=False)


FAST = dict(num_tokens=2, batch_size=1, checkpoint_every=2)


def _finetunable(folder, photo, model):
    s = Session.create(folder, photo, resolution=32, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    return s


@pytest.mark.parametrize("broken", ["loss", "weights"])
def test_a_non_finite_finetune_stops_before_saving_and_the_finished_weights_stay(tmp_path, photo, tiny_model_dirs,
                                                                                 monkeypatch, broken):
    """resume=False over a finished finetune: a NaN loss (or weights made infinite by a huge learning rate)
    stops the run at the step it happened, before any save; the finished weights stay on disk and in the
    session object, which can go on recording edits."""
    F = importlib.import_module("dedit_nb.finetune")
    import torch
    from dedit_nb.models import load_model
    model = load_model(str(tiny_model_dirs["sd"]))
    s = _finetunable(tmp_path / "s", photo, model)
    F.finetune(model, s, F.FinetuneConfig(stage1_steps=1, stage2_steps=1, **FAST), progress=False)
    before, weights = _digest(tmp_path / "s"), s.load_weights("unet")
    if broken == "loss":
        loss = F._Run.loss
        monkeypatch.setattr(F._Run, "loss", lambda *a: loss(*a) * NAN)
        cfg, says = F.FinetuneConfig(stage1_steps=2, stage2_steps=1, **FAST), r"the loss became NaN .* stage 1, step 0"
    else:
        class Overflowing(torch.optim.AdamW):      # what an fp16 overflow or a huge learning rate can do
            def step(self, closure=None):
                super().step(closure)
                with torch.no_grad():
                    for p in self.param_groups[0]["params"]:
                        p.fill_(INF)
        monkeypatch.setattr(torch.optim, "AdamW", Overflowing)
        cfg = F.FinetuneConfig(stage1_steps=1, stage2_steps=1, **FAST)
        says = r"the learned tokens weights became NaN or infinite at stage 1, step 0"
    with pytest.raises(F.NonFiniteError, match=says):
        F.finetune(model, s, cfg, progress=False, resume=False)
    assert _digest(tmp_path / "s") == before
    assert s.finetune_state["done"] and all(torch.equal(s.load_weights("unet")[n], weights[n]) for n in weights)
    s.record_edit({"kind": "test"})
    assert Session.open(tmp_path / "s").finetune_state["done"]


def test_an_interrupted_finetune_leaves_no_gradients_for_the_next_one_on_the_model(tmp_path, photo, tiny_model_dirs,
                                                                                    monkeypatch):
    """Ctrl-C between the backward passes of a stage-2 step (gradient accumulation): the next finetune of
    another session on the same model object ends with the weights it gets on a freshly loaded model."""
    import torch
    F = importlib.import_module("dedit_nb.finetune")
    from dedit_nb.models import load_model
    folder = str(tiny_model_dirs["sd"])
    shared = load_model(folder)
    first = _finetunable(tmp_path / "first", photo, shared)
    interrupted, other, reference = (first.copy_to(tmp_path / n) for n in ("interrupted", "other", "reference"))
    cfg = F.FinetuneConfig(stage1_steps=1, stage2_steps=2, stage1_lr=1e-2, stage2_lr=1e-2, grad_accum=2, **FAST)
    loss, calls = F._Run.loss, []

    def interrupting(run, *args):
        calls.append(run.model.unet.training)
        if len(calls) == 4:         # stage 2's first step, second backward pass
            raise KeyboardInterrupt
        return loss(run, *args)

    monkeypatch.setattr(F._Run, "loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        F.finetune(shared, interrupted, cfg, progress=False)
    monkeypatch.setattr(F._Run, "loss", loss)
    modules = [shared.unet, *(slot.encoder for slot in shared.conditioner.slots)]
    assert all(p.grad is None for m in modules for p in m.parameters())
    F.finetune(shared, other, cfg, progress=False)
    F.finetune(load_model(folder), reference, cfg, progress=False)
    for kind in ("tokens", "unet"):
        mine, fresh = other.load_weights(kind), reference.load_weights(kind)
        assert set(mine) == set(fresh) and all(torch.allclose(mine[n], fresh[n], atol=1e-6) for n in mine)


# --- 2 and 28.9: output folders that are not ours, numbered reruns ---------------------------------------
def _edit_result(images=1, value=0):
    from dedit_nb import masks as M
    from dedit_nb.edits import EditResult
    image = np.full((8, 8, 3), value, np.uint8)
    return EditResult("recon", [image] * images, image, np.zeros((8, 8), np.int32),
                      M.edit_regions(np.eye(8, dtype=bool), 1), {"kind": "recon"})


def _users_folder(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(f"the user's {name}".encode())
    return _digest(folder)


def test_an_edit_never_writes_into_a_folder_of_the_users(tmp_path):
    from dedit_nb.reruns import EDIT_MARKER, choose_folder
    mine = _users_folder(tmp_path / "out", ["image_0.png", "image_1.png", "image_2.png", "image_7.png",
                                            "labels.npy", "notes.md"])
    folder, note = choose_folder(tmp_path / "out", overwrite=True, marker=EDIT_MARKER, what="an edit")
    assert folder == tmp_path / "out-2" and "did not write" in note
    with pytest.warns(UserWarning, match="out-2"):
        written = _edit_result(images=2).save(tmp_path / "out")
    assert written == tmp_path / "out-2" and (written / "image_1.png").exists()
    assert _digest(tmp_path / "out") == mine
    (written / "image_7.png").write_bytes(b"the user's")               # dropped into a folder of ours
    _edit_result(images=1).save(written)
    assert sorted(p.name for p in written.glob("image_*")) == ["image_0.png", "image_7.png"]
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / EDIT_MARKER).write_text('{"mine": true}')      # a manifest that is not ours
    assert choose_folder(tmp_path / "fake", overwrite=True, marker=EDIT_MARKER)[0] == tmp_path / "fake-2"


def test_a_batch_never_writes_its_report_into_a_folder_of_the_users(tmp_path, monkeypatch):
    from dedit_nb import batch
    mine = _users_folder(tmp_path / "out", ["index.md", "index.html", "report.json"])
    monkeypatch.setattr(batch, "run_one", lambda nb, folder, params, *a: batch.RunResult(
        os.path.basename(folder), params, False, folder, error="not run"))
    spec = {"notebook": "nb.ipynb", "output": "out", "grid": {"seed": [0, 1]}}
    (tmp_path / "nb.ipynb").write_text("{}")
    with pytest.warns(UserWarning, match="out-2"):
        batch.run_batch(spec, tmp_path)
    assert _digest(tmp_path / "out") == mine
    assert json.loads((tmp_path / "out-2" / "report.json").read_text())["failed"] == 2
    assert batch.batch_output({**spec, "output": "out-2"}, tmp_path) == (tmp_path / "out-2", None)  # ours: reused


def test_numbered_rerun_folders_skip_every_taken_number_and_never_overwrite_an_edit(tmp_path):
    from dedit_nb.reruns import EDIT_MARKER, choose_folder
    for name in ("edit", "edit-2", "edit-3"):
        _edit_result(value=len(name)).save(tmp_path / name)
    (tmp_path / "edit-5").mkdir()
    earlier = {name: _digest(tmp_path / name) for name in ("edit", "edit-2", "edit-3", "edit-5")}
    folder, note = choose_folder(tmp_path / "edit", marker=EDIT_MARKER, what="an edit")
    assert folder == tmp_path / "edit-4" and "already holds an edit" in note
    _edit_result(value=9).save(folder)
    assert choose_folder(tmp_path / "edit", marker=EDIT_MARKER)[0] == tmp_path / "edit-6"
    assert {name: _digest(tmp_path / name) for name in earlier} == earlier


# --- 3: grid files are data --------------------------------------------------------------------------------
def _grid(tmp_path, text):
    (tmp_path / "grid.yaml").write_text(text)
    return tmp_path / "grid.yaml"


@pytest.mark.parametrize("spec, says", [
    ({"grid": {"x=__import__('os').system('touch PWNED')#": [1]}}, "is not a parameter name"),
    ({"parameters": {"strenght": 0.5}}, "did you mean 'strength'"),
    ({"grid": {"prompt": "a green circle"}}, "grid: prompt should be a list of values"),
    ({"grid": {"seed": 5}}, "grid: seed should be a list of values"),
    ({"runs": ["remove"]}, "'runs' is a list of parameter mappings"),
    ({"parameters": {"batch_grid": "grid.yaml"}}, "cannot run a grid itself"),
    ({"grid": {"seed": [object()]}}, "not text, a number"),
    ({"grid": {"guidance": ["high"]}}, "parameter 'guidance'"),
    ({"grid": {k: list(range(10)) for k in ("seed", "steps", "dx", "dy", "scale", "strength", "guidance",
                                                "num_images", "edge_thickness")}}, "1000000000 runs"),
])
def test_grid_specs_are_checked_before_any_run(tmp_path, monkeypatch, spec, says):
    from dedit_nb import batch
    ran = []
    monkeypatch.setattr(batch, "run_one", lambda *a: ran.append(a))
    (tmp_path / "03_edit.ipynb").write_text("{}")
    with pytest.raises(batch.GridError, match=says):
        batch.run_batch({"notebook": "03_edit.ipynb", "output": "out", **spec}, tmp_path, yes=True)
    assert not ran and not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()


def test_run_one_refuses_a_name_that_is_code_before_papermill_sees_it(tmp_path):
    from dedit_nb.batch import GridError, run_one
    with pytest.raises(GridError, match="is not a parameter name"):
        run_one(str(tmp_path / "03_edit.ipynb"), str(tmp_path / "run"), {"x=1;import os#": 1})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, says", [
    ("notebook: n.ipynb\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
     + "grid: {prompt: *i}\n", "more than 100000 values"),
    ("notebook: n.ipynb\ngrid: &g {seed: [1, *g]}\n", "contains itself"),
    ("notebook: [n.ipynb]\n", "at least 'notebook'"),
    ("notebook: n.ipynb\ngrid: {seed: [1\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
])
def test_grid_files_are_read_as_data_with_a_limit_on_alias_expansion(tmp_path, text, says):
    from dedit_nb.batch import GridError, load_grid
    with pytest.raises(GridError, match=says):
        load_grid(_grid(tmp_path, text))
    assert not (tmp_path / "PWNED").exists()


def test_a_large_grid_states_its_count_and_needs_yes(tmp_path, monkeypatch, capsys):
    from dedit_nb import batch
    ran = []
    monkeypatch.setattr(batch, "run_one", lambda nb, folder, params, *a: ran.append(params) or batch.RunResult(
        os.path.basename(folder), params, True, folder))
    (tmp_path / "03_edit.ipynb").write_text("{}")
    grid = _grid(tmp_path, "notebook: 03_edit.ipynb\noutput: out\ngrid: {seed: %s}\n"
                 % list(range(batch.CONFIRM_RUNS + 1)))
    with pytest.raises(batch.GridError, match="yes=True"):
        batch.run_batch(batch.load_grid(grid), tmp_path)
    with pytest.raises(SystemExit):
        batch.main([str(grid)])
    assert f"makes {batch.CONFIRM_RUNS + 1} runs" in capsys.readouterr().err and not ran
    assert batch.main([str(grid), "--yes"]) == 0 and len(ran) == batch.CONFIRM_RUNS + 1
    assert f"{batch.CONFIRM_RUNS + 1} runs" in capsys.readouterr().out


def test_write_report_grows_linearly_with_the_runs(tmp_path, monkeypatch):
    """Counted, not timed: the JSON encodings the report makes per run stay constant as the batch grows."""
    from dedit_nb import batch
    calls = []
    dumps = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *a, **k: calls.append(1) or dumps(*a, **k))
    per_run = []
    for n in (50, 200):
        calls.clear()
        results = [batch.RunResult(f"run-{i:03d}", {"seed": i, "prompt": "p", "steps": 2}, True, str(tmp_path))
                   for i in range(n)]
        batch.write_report(results, tmp_path)
        per_run.append(len(calls) / n)
    assert per_run[1] <= per_run[0] * 1.1 and per_run[1] < 10


# --- 5: interrupts, deleted folders, unique names -----------------------------------------------------------
def test_an_interrupt_after_a_record_is_written_does_not_write_it_twice(tmp_path, monkeypatch):
    from dedit_nb.session import core as S     # where Session.save looks the collection up
    s = _session(tmp_path / "s")
    collect = S._collect_garbage

    def interrupted(*args):
        monkeypatch.setattr(S, "_collect_garbage", collect)
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_collect_garbage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.record_edit({"kind": "first"})
    s.record_edit({"kind": "second"})
    assert [h["kind"] for h in Session.open(tmp_path / "s").history] == ["first", "second"]


@pytest.mark.parametrize("gone", ["folder", "session.json"])
def test_a_session_whose_folder_was_deleted_is_not_recreated_by_a_save(tmp_path, gone):
    import shutil
    s = _session(tmp_path / "s")
    if gone == "folder":
        shutil.rmtree(tmp_path / "s")
    else:
        (tmp_path / "s" / "session.json").unlink()
    before = _digest(tmp_path)
    for change in (lambda: s.record_edit({"kind": "x"}), lambda: s.rename_item(0, 0, "cup"), s.save):
        with pytest.raises(SessionError, match="no longer holds this session.*nothing was written"):
            change()
    assert _digest(tmp_path) == before and (gone == "session.json") == (tmp_path / "s").exists()


def test_item_names_stay_unique_and_an_edit_by_name_never_hits_another_item(tmp_path):
    s = _session(tmp_path / "s")
    s.set_items(0, three_item_labels(64, 96), ["cup", "cup", "cup-2"])
    assert [it.name for it in s.images[0].items] == ["cup", "cup-3", "cup-2"]
    with pytest.raises(SessionError, match="already has an item named 'cup'"):
        s.rename_item(0, 2, "cup")
    data = json.loads((tmp_path / "s" / "session.json").read_text())
    for item in data["images"][0]["items"]:                              # written by an older version: "label"
        item["label"] = item.pop("name")
    data["images"][0]["items"][1]["label"] = "cup"
    (tmp_path / "s" / "session.json").write_text(json.dumps(data))
    with pytest.raises(SessionError, match=r"2 items named 'cup' \(indexes \[0, 1\]\)"):
        Session.open(tmp_path / "s").images[0].item_index("cup")


def test_the_mask_editor_never_names_a_new_item_like_an_existing_one():
    from widgets.state import ItemState
    state = ItemState(np.zeros((12, 12, 3), np.uint8), three_item_labels(12, 12), ["item0", "item1", "item2"])
    state.delete(1)
    state.add_item()
    assert len(set(state.names)) == len(state.names) == 3


# --- 28.5: temporaries of killed writes -----------------------------------------------------------------
def test_temporaries_of_killed_writes_in_every_data_folder_are_removed_on_open(tmp_path):
    """A kill between writing a data file's temporary and renaming it leaves ``.<name>.<random>.tmp`` (a
    weights file's can be gigabytes); opening the session removes those, and nothing of the user's."""
    import tempfile
    s = _session(tmp_path / "s")
    folder = tmp_path / "s"
    killed = []
    for rel in ("session.json", s.images[0].original_file, s.images[0].working_file, "items/0-0123456789abcdef.npy",
                "weights/unet-0123456789abcdef.safetensors"):
        target = folder / rel
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        killed.append(tmp)
    users = [folder / "images" / ".my-notes.tmp", folder / "items" / ".draft.swp.tmp", folder / ".mine.tmp"]
    for path in users:
        path.write_text("the user's")
    with pytest.warns(UserWarning, match="left alone"):
        Session.open(folder)
    assert not [t for t in killed if os.path.exists(t)]
    assert all(p.read_text() == "the user's" for p in users)


# --- 6: inputs that would hang or exhaust memory ---------------------------------------------------------
def test_a_fifo_or_folder_as_the_image_is_refused_at_once(tmp_path):
    from dedit_nb.images import ImageInputError
    import threading
    import time
    os.mkfifo(tmp_path / "pipe.png")          # opening it for reading would wait for a writer forever
    (tmp_path / "folder.png").mkdir()

    def unblock_a_reader():                   # so that a regression fails this test instead of hanging it
        for _ in range(100):
            try:
                fd = os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:                   # no reader yet
                time.sleep(0.1)
                continue
            os.write(fd, b"not an image")
            os.close(fd)
            return

    threading.Thread(target=unblock_a_reader, daemon=True).start()
    for name in ("pipe.png", "folder.png"):
        with pytest.raises(ImageInputError, match="not a regular file"):
            Session.create(tmp_path / f"s-{name}", tmp_path / name)
        assert not (tmp_path / f"s-{name}").exists()


@pytest.mark.parametrize("size, resolution, says", [
    ((100000, 2), 512, r"aspect ratio of 50000:1, beyond the limit of 16:1"),
    ((1600, 100), 512, None),
    ((64, 64), 8192, r"8192x8192, beyond the limit of 16 megapixels"),
])
def test_absurd_shapes_and_working_sizes_are_refused_naming_the_limit(tmp_path, monkeypatch, size, resolution,
                                                                       says):
    from dedit_nb import images
    from dedit_nb.images import ImageInputError
    resized = []
    monkeypatch.setattr(images, "resize_rgb", lambda arr, to: resized.append(to) or np.zeros((*to[::-1], 3), np.uint8))
    image = np.zeros(size[::-1] + (3,), np.uint8)
    if says is None:                          # at the limit: accepted
        assert Session.create(tmp_path / "s", image, resolution=resolution, save=False).images[0].size == (8192, 512)
        return
    with pytest.raises(ImageInputError, match=says):
        Session.create(tmp_path / "s", image, resolution=resolution)
    assert not resized and not (tmp_path / "s").exists()      # refused before any allocation at the working size


# --- 7: 03 on a read-only session ------------------------------------------------------------------------
def test_an_edit_of_a_read_only_session_runs_unrecorded_into_output_dir_and_says_so(tmp_path, photo, monkeypatch,
                                                                                   tiny_model_dirs):
    from dedit_nb.finetune import FinetuneConfig, finetune
    from dedit_nb.models import load_model
    from dedit_nb.notebook import edit_recording, headless_edit
    from test_session import read_only
    model = load_model(str(tiny_model_dirs["sd"]))
    folder = tmp_path / "shared"
    s = _finetunable(folder, photo, model)
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    assert edit_recording(s) == (True, None)
    with read_only(monkeypatch, folder):
        before = _digest(folder)
        opened = Session.open(folder)
        record, note = edit_recording(opened)
        assert not record and "history was not updated" in note and "\n" not in note
        result = headless_edit(model, opened, "text", tmp_path / "out", item="left", prompt="a red cup",
                               record=record, progress=False, steps=2, guidance=1.0)
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["kind"] == "text" and len(result.images) == 1
        assert _digest(folder) == before and opened.history == []
