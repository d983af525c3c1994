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
                          labels=three_item_labels(*image.shape[:2]), item_labels=["a", "b", "c"])


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
    with pytest.raises(ValueError, match="finite|seed must be between"):
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
    modules = [shared.unet, *(slot.encoder for slot in shared.text.slots)]
    assert all(p.grad is None for m in modules for p in m.parameters())
    F.finetune(shared, other, cfg, progress=False)
    F.finetune(load_model(folder), reference, cfg, progress=False)
    for kind in ("tokens", "unet"):
        mine, fresh = other.load_weights(kind), reference.load_weights(kind)
        assert set(mine) == set(fresh) and all(torch.allclose(mine[n], fresh[n], atol=1e-6) for n in mine)
