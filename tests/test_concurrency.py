"""Several processes on one session, and kills in the middle of saves: nothing recorded is lost, nothing
referenced is deleted, and a joint finetune resumed through any member ends as an uninterrupted run."""
import json
import multiprocessing as mp
import os
import stat

import pytest
import torch

from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model
from dedit_nb.session import Session, SessionError, atomic_write_bytes, save_joint_weights, settle_joint
from conftest import three_item_labels
import session_workers as W

CFG = dict(num_tokens=2, batch_size=1, checkpoint_every=1, stage1_steps=3, stage2_steps=3, stage1_lr=1e-2,
           stage2_lr=1e-2)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in the child processes: the same reduction order, so the same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_session(folder, photo, labels=three_item_labels, session_id=None):
    s = Session.create(folder, photo, resolution=32, multiple=16, session_id=session_id)
    h, w = s.images[0].labels.shape
    s.set_items(0, labels(h, w), ["left", "right", "top"])
    return s


def referenced_files_exist(folder):
    data = json.loads((folder / "session.json").read_text())
    files = [e[k] for e in data["images"] for k in ("original", "working", "labels")]
    files += list((data["weights"] or {}).get("files", {}).values())
    return all((folder / f).exists() for f in files)


def test_processes_recording_at_once_keep_every_record(tmp_path, photo):
    folder = tmp_path / "s"
    make_session(folder, photo)
    n = 6
    ctx = mp.get_context("fork")       # the workers only touch numpy/PIL/json
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=W.append_record, args=(str(folder), i, barrier)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    history = Session.open(folder).history
    assert sorted(r["worker"] for r in history) == list(range(n))


def test_a_stale_session_saving_after_a_retrain_keeps_the_new_weights(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    folder = tmp_path / "s"
    cfg = FinetuneConfig(**{**CFG, "stage1_steps": 1, "stage2_steps": 1})
    finetune(model, make_session(folder, photo), cfg, progress=False)
    stale, reader = Session.open(folder), Session.open(folder)    # e.g. 03_edit runs opened before 02 ran again
    fresh = finetune(model, Session.open(folder), FinetuneConfig(**{**CFG, "stage1_steps": 1, "stage2_steps": 1,
                                                                     "seed": 5}), resume=False, progress=False)
    assert fresh.completed
    retrained = Session.open(folder).load_weights("unet")
    stale.record_edit({"kind": "recon"})
    assert referenced_files_exist(folder)
    again = Session.open(folder)
    assert [r["kind"] for r in again.history] == ["recon"]
    assert all(torch.equal(again.load_weights("unet")[n], retrained[n]) for n in retrained)
    assert all(torch.equal(stale.load_weights("unet")[n], retrained[n]) for n in retrained)  # took the new state
    with pytest.raises(SessionError, match="were replaced .* since it was opened; open the session again"):
        reader.load_weights("unet")                # its weights files are gone: a clear error, not a KeyError


@pytest.mark.slow
def test_records_made_during_a_finetune_in_another_process_never_dangle(tmp_path, photo, tiny_model_dirs):
    folder = tmp_path / "s"
    model = load_model(str(tiny_model_dirs["sd"]))
    finetune(model, make_session(folder, photo), FinetuneConfig(**{**CFG, "stage1_steps": 1, "stage2_steps": 1}),
             progress=False)
    stop = tmp_path / "stop"
    ctx = mp.get_context("spawn")
    trainer = ctx.Process(target=W.finetune_then_signal,
                          args=(str(tiny_model_dirs["sd"]), str(folder), str(stop), {**CFG, "seed": 3}))
    recorders = [ctx.Process(target=W.record_until, args=(str(folder), str(stop), i)) for i in range(2)]
    for p in [trainer, *recorders]:
        p.start()
    for p in [trainer, *recorders]:
        p.join(300)
    assert [p.exitcode for p in [trainer, *recorders]] == [0, 0, 0]
    s = Session.open(folder)                       # every referenced file exists (open checks them)
    assert s.finetune_state["done"] and referenced_files_exist(folder)
    counts = [json.loads((tmp_path / f"records-{i}.json").read_text()) for i in range(2)]
    assert sum(counts) >= 2 and len(s.history) == sum(counts)
    # the weights are those of the finetune, not of the session the recorders opened before it ended
    reference = make_session(tmp_path / "ref", photo, session_id=s.id)
    finetune(load_model(str(tiny_model_dirs["sd"])), reference, FinetuneConfig(**{**CFG, "seed": 3}), progress=False)
    ours, theirs = s.load_weights("unet"), reference.load_weights("unet")
    assert all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in theirs)


@pytest.mark.slow
@pytest.mark.parametrize("when, resume_through", [("current", 1), ("pending", 0)])
def test_joint_finetune_killed_between_member_saves_resumes_to_the_uninterrupted_weights(
        tmp_path, photo, tiny_model_dirs, when, resume_through):
    model_dir = str(tiny_model_dirs["sd"])
    flipped = lambda h, w: three_item_labels(h, w)[::-1].copy()  # noqa: E731
    straight = [make_session(tmp_path / "a0", photo), make_session(tmp_path / "a1", photo[::-1], flipped)]
    finetune(load_model(model_dir), straight[0], FinetuneConfig(**CFG), extra_sessions=straight[1:], progress=False)

    folders = [tmp_path / "b0", tmp_path / "b1"]
    for folder, twin, image, labels in zip(folders, straight, (photo, photo[::-1]), (three_item_labels, flipped)):
        make_session(folder, image, labels, session_id=twin.id)  # same token names, so the runs are comparable
    child = mp.get_context("spawn").Process(target=W.joint_finetune_killed,
                                            args=(model_dir, [str(f) for f in folders], CFG, str(folders[1]), when))
    child.start()
    child.join(300)
    assert child.exitcode == -9                     # killed while replacing the second member's session.json
    assert list(folders[1].glob(".*.tmp"))          # the kill left the temporary file behind

    members = [Session.open(f) for f in folders]
    assert not list(folders[1].glob(".*.tmp"))      # removed when the session was opened
    main = members[resume_through]
    result = finetune(load_model(model_dir), main, FinetuneConfig(**CFG),
                      extra_sessions=[m for m in members if m is not main], progress=False)
    assert result.completed
    for folder, twin in zip(folders, straight):
        s = Session.open(folder)
        assert s.finetune_state["done"]
        for kind in ("tokens", "unet"):
            a, b = twin.load_weights(kind), s.load_weights(kind)
            assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), (folder, kind)
    generations = {Session.open(f).finetune_state["generation"] for f in folders}
    assert len(generations) == 1


class Killed(BaseException):
    """The process dying at a write (raised instead of os.replace, so the file keeps its old content)."""


def joint_checkpoint(members, step):
    """Save checkpoint ``step`` of a joint finetune of ``members`` (tensors that name the step)."""
    meta = {"mode": "attn", "num_tokens": 1, "joint": [{"id": s.id, "folder": str(s.folder)} for s in members]}
    tensors = {"tokens": {"0/t": torch.full((2, 4), float(step))}, "unet": {"a.attn2.to_k.weight": torch.eye(3) * step}}
    state = {"config": {}, "stage": 2, "step": step, "done": False, "loss": {}}
    save_joint_weights(members, tensors, "m", meta, state)


@pytest.mark.parametrize("victim, write, settled_step", [(1, 1, 1), (0, 2, 2), (1, 2, 2)],
                         ids=["second-member-pending", "first-member-promotion", "second-member-promotion"])
def test_a_joint_checkpoint_is_promoted_only_once_every_member_holds_it(tmp_path, photo, monkeypatch, victim, write,
                                                                        settled_step):
    """Checkpoint 2 of a joint finetune is killed at the ``write``-th replacement of member ``victim``'s
    session.json (1: its pending copy, 2: its promotion): the members settle on the newest checkpoint that
    every one of them holds, all at the same generation, with that checkpoint's tensors."""
    folders = [tmp_path / "m0", tmp_path / "m1"]
    members = [make_session(f, photo) for f in folders]
    joint_checkpoint(members, 1)
    first = members[0].weights_generation
    real_replace, writes = os.replace, []

    def replace(src, dst):
        if os.path.abspath(dst) == os.path.abspath(folders[victim] / "session.json"):
            writes.append(dst)
            if len(writes) == write:
                raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        joint_checkpoint(members, 2)
    monkeypatch.undo()
    reopened = [Session.open(f) for f in folders]
    if settled_step == 1:                           # only member 0 holds checkpoint 2, as pending: never current
        assert [s.weights_generation for s in reopened] == [first, first]
    settled = settle_joint(reopened)
    assert [s.id for s in settled] == [s.id for s in members]
    generations = {s.weights_generation for s in settled}
    assert len(generations) == 1 and (generations == {first}) == (settled_step == 1)
    for folder in folders:
        s = Session.open(folder)
        data = json.loads((folder / "session.json").read_text())
        assert "pending" not in data and s.finetune_state["step"] == settled_step
        assert s.weights_generation in generations and referenced_files_exist(folder)
        assert torch.equal(s.load_weights("tokens")["0/t"], torch.full((2, 4), float(settled_step)))
        assert torch.equal(s.load_weights("unet")["a.attn2.to_k.weight"], torch.eye(3) * settled_step)


def test_files_are_written_with_the_users_umask(tmp_path, photo):
    old = os.umask(0o002)
    try:
        Session.create(tmp_path / "s", photo, resolution=32, multiple=16)
        atomic_write_bytes(tmp_path / "out" / "manifest.json", b"{}")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != ".session.lock"]
    files.append(tmp_path / "out" / "manifest.json")
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}


def test_a_second_finetune_started_from_a_stale_session_is_refused_not_mixed(tmp_path, photo, tiny_model_dirs):
    folder = tmp_path / "s"
    make_session(folder, photo)
    first, second = Session.open(folder), Session.open(folder)       # two 02_finetune runs started together
    cfg = FinetuneConfig(**{**CFG, "stage1_steps": 1, "stage2_steps": 1})
    finetune(load_model(str(tiny_model_dirs["sd"])), first, cfg, progress=False)
    saved = Session.open(folder).load_weights("unet")
    with pytest.raises(SessionError, match="changed by another process .* open the session again"):
        finetune(load_model(str(tiny_model_dirs["sd"])), second, FinetuneConfig(**{**CFG, "seed": 9}),
                 resume=False, progress=False)
    after = Session.open(folder)
    assert after.finetune_state["done"] and referenced_files_exist(folder)
    assert all(torch.equal(after.load_weights("unet")[n], saved[n]) for n in saved)
