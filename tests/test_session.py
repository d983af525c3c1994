"""Sessions: create, open, save atomically, refuse bad input without touching the folder."""
import contextlib
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from dedit_nb import masks as M
from dedit_nb.images import ImageInputError, working_size
from dedit_nb.session import Session, SessionError
from conftest import three_item_labels


def folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_create_keeps_the_original_and_works_at_multiples_without_cropping(tmp_path, photo):
    src = tmp_path / "coffee.png"
    Image.fromarray(photo).save(src)
    s = Session.create(tmp_path / "s", src, resolution=256, multiple=64)
    entry = s.images[0]
    assert (tmp_path / "s" / entry.original_file).read_bytes() == src.read_bytes()
    w, h = entry.size
    assert w % 64 == 0 and h % 64 == 0 and min(w, h) == 256         # resolution is the short side
    assert w / h == photo.shape[1] / photo.shape[0]                  # aspect kept (600x400 -> 384x256)
    assert (entry.labels == 0).all() and [i.name for i in entry.items] == ["image"]


def test_create_takes_the_session_id_that_names_its_tokens(tmp_path, photo):
    s = Session.create(tmp_path / "s", photo, resolution=64, multiple=32, session_id="ab12")
    assert s.id == Session.open(tmp_path / "s").id == "ab12"
    assert all(t.startswith("<ab120.") for t in s.assign_tokens(1))
    for bad in ["", "AB", "a b", "<a>", "a" * 17, 12]:      # not a token name's start: refused, nothing written
        with pytest.raises(SessionError, match="session_id .* lowercase letters and digits"):
            Session.create(tmp_path / "bad", photo, resolution=64, multiple=32, session_id=bad)
        assert not (tmp_path / "bad").exists()


def test_reload_drops_unsaved_changes_and_leaves_a_session_never_saved_as_it_is(tmp_path, photo):
    new = Session.create(tmp_path / "new", photo, resolution=64, multiple=32, save=False)
    new.reload()                                    # nothing on disk to read (settle_joint reloads every member)
    assert len(new.images) == 1 and not (tmp_path / "new").exists()
    s = Session.create(tmp_path / "s", photo, resolution=64, multiple=32)
    s.rename_item(0, 0, "cup", save=False)
    s.reload()
    assert [it.name for it in s.images[0].items] == ["image"]


def test_roundtrip_of_items_and_history(tmp_path, photo):
    s = Session.create(tmp_path / "s", photo, resolution=128, multiple=32)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"], templates=["*", "a photo of *", "*"])
    s.add_image(photo[::-1], name="flipped")
    s.record_edit({"kind": "recon"})
    again = Session.open(tmp_path / "s")
    assert np.array_equal(again.images[0].labels, s.images[0].labels)
    assert [i.name for i in again.images[0].items] == ["left", "right", "top"]
    assert again.images[0].items[1].template == "a photo of *"
    assert again.image("flipped").size == s.images[1].size
    assert again.history[0]["kind"] == "recon"
    assert again.id == s.id
    # only the current label map files are kept
    assert len(list((tmp_path / "s" / "items").iterdir())) == 2


@pytest.mark.parametrize("bad, match", [
    (lambda h, w: np.zeros((h + 1, w), np.int32), "resize it"),
    (lambda h, w: np.full((h, w), 5, np.int32), "outside 0..2"),
    (lambda h, w: np.where(three_item_labels(h, w) == 2, 0, three_item_labels(h, w)), "have no pixels"),
])
def test_bad_items_raise_and_leave_the_folder_unchanged(tmp_path, photo, bad, match):
    s = Session.create(tmp_path / "s", photo, resolution=128, multiple=32)
    before = folder_digest(tmp_path / "s")
    h, w = s.images[0].labels.shape
    with pytest.raises(M.PartitionError, match=match):
        s.set_items(0, bad(h, w), ["a", "b", "c"])
    assert folder_digest(tmp_path / "s") == before
    assert (Session.open(tmp_path / "s").images[0].labels == 0).all()


def test_existing_folder_is_not_overwritten(tmp_path, photo):
    Session.create(tmp_path / "s", photo, resolution=128, multiple=32)
    with pytest.raises(SessionError, match="already holds a session"):
        Session.create(tmp_path / "s", photo)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SessionError, match="not an empty folder"):
        Session.create(tmp_path / "other", photo)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_atomic_save_survives_a_crash_mid_write(tmp_path, photo, monkeypatch):
    s = Session.create(tmp_path / "s", photo, resolution=128, multiple=32)
    before = (tmp_path / "s" / "session.json").read_bytes()
    h, w = s.images[0].labels.shape
    import os
    real = os.replace

    def crash(src, dst):
        if str(dst).endswith("session.json"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        s.set_items(0, three_item_labels(h, w), ["a", "b", "c"])
    monkeypatch.setattr(os, "replace", real)
    assert (tmp_path / "s" / "session.json").read_bytes() == before
    assert not [p for p in (tmp_path / "s").rglob("*.tmp")]
    reopened = Session.open(tmp_path / "s")
    assert (reopened.images[0].labels == 0).all()


@pytest.mark.parametrize("image", [
    np.zeros((40, 60), np.uint8),                                  # grayscale
    np.zeros((40, 60, 4), np.uint8),                               # RGBA
    (np.arange(2400, dtype=np.uint16).reshape(40, 60) * 27),       # 16-bit
    np.random.default_rng(0).random((40, 60, 3)),                  # float
])
def test_any_image_kind_becomes_rgb(tmp_path, image):
    s = Session.create(tmp_path / "s", image, resolution=64, multiple=16)
    assert s.images[0].working.dtype == np.uint8 and s.images[0].working.shape[2] == 3


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="cannot read"):
        Session.create(tmp_path / "s", tmp_path / "broken.png")
    with pytest.raises(ImageInputError, match="does not exist"):
        Session.create(tmp_path / "s", tmp_path / "missing.png")
    assert not (tmp_path / "s" / "session.json").exists()


def test_working_size():
    assert working_size(600, 400, 512, 8) == (768, 512)      # short side = resolution, as SD users mean it
    assert working_size(400, 600, 512, 8) == (512, 768)
    assert working_size(2048, 1536, 512, 8) == (680, 512)    # 682.7 px: cropped to a multiple, not stretched
    with pytest.raises(ImageInputError):
        working_size(100, 100, 32, 64)


def test_huge_images_are_refused(tmp_path, monkeypatch):
    import dedit_nb.images as I
    monkeypatch.setattr(I, "MAX_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="downscale it"):
        Session.create(tmp_path / "s", np.zeros((40, 40, 3), np.uint8))
    assert not (tmp_path / "s" / "session.json").exists()


def test_overwrite_replaces_every_file_of_the_old_session(tmp_path, photo):
    first = Session.create(tmp_path / "s", photo, resolution=64, multiple=16)
    flipped = photo[::-1].copy()
    second = Session.create(tmp_path / "s", flipped, resolution=64, multiple=16, overwrite=True)
    assert second.id != first.id
    again = Session.open(tmp_path / "s")
    from dedit_nb.images import resize_rgb
    assert np.array_equal(again.images[0].working, resize_rgb(flipped, again.images[0].size))
    assert len(list((tmp_path / "s" / "images").iterdir())) == 2       # one original, one working image


def test_exif_orientation_is_applied_as_viewers_show_the_photo(tmp_path):
    stored = np.zeros((451, 300, 3), np.uint8)          # 300 wide, 451 high as stored
    stored[:60, :60] = (255, 0, 0)                      # a red corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                    # orientation 6: shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    s = Session.create(tmp_path / "s", tmp_path / "phone.jpg", resolution=64, multiple=8)
    w, h = s.images[0].size
    assert w > h                                        # shown 451x300: worked on in landscape
    working = s.images[0].working.astype(int)
    assert working[2, -3, 0] > 200 and working[2, -3, 1] < 60      # the red corner is now top right
    assert (tmp_path / "s" / s.images[0].original_file).read_bytes() == (tmp_path / "phone.jpg").read_bytes()


def _fake_weights(s):
    import torch
    state = {"config": {}, "model_id": "m", "stage": 2, "step": 1, "done": True, "loss": {}}
    s.save_weights({"tokens": {"t/0": torch.zeros(2, 4)}, "unet": {"a.attn2.to_k.weight": torch.ones(3, 3)}}, "m",
                   {"mode": "attn", "num_tokens": 1, "joint": [{"id": s.id, "folder": str(s.folder)}]}, state)


def _edit_json(change):
    def corrupt(folder):
        data = json.loads((folder / "session.json").read_text())
        data = change(data)
        (folder / "session.json").write_text(json.dumps(data))
    return corrupt


def _file(key):
    def locate(folder):
        data = json.loads((folder / "session.json").read_text())
        return folder / (data["weights"]["files"][key] if key in ("unet", "tokens") else data["images"][0][key])
    return locate


def _write(key, blob):
    return lambda folder: _file(key)(folder).write_bytes(blob(folder) if callable(blob) else blob)


def _object_npy(folder):
    import io
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()



@pytest.mark.parametrize("corrupt, names, says", [
    (_edit_json(lambda d: [d]), "session.json", "holds a JSON list"),
    (_edit_json(lambda d: {**d, "images": {"0": d["images"][0]}}), "session.json", "'images' should be a list"),
    (_edit_json(lambda d: {**d, "images": [{**d["images"][0], "items": [{"label": 3}]}]}), "session.json",
     "items[0] should be"),
    (_edit_json(lambda d: {**d, "format": "1"}), "session.json", 'has "format": "1" (str)'),
    (_edit_json(lambda d: {**d, "format": 2}), "session.json", "has format 2; this version reads format 1"),
    (_edit_json(lambda d: {**d, "weights": {**d["weights"], "files": {"tokens": d["weights"]["files"]["tokens"]}}}),
     "session.json", "lists no unet weights"),
    (_edit_json(lambda d: {**d, "images": [{**d["images"][0], "labels": "../../outside.npy"}]}), "session.json",
     "not a file in one of the session's folders"),
    (lambda f: _file("working")(f).unlink(), "images/0-working", "is missing"),
    (lambda f: _file("labels")(f).unlink(), "items/0-", "is missing"),
    (_write("labels", _object_npy), "items/0-", "allow_pickle"),
    (_write("labels", b"\x93NUMPY garbage"), "items/0-", "not a valid label map"),
    (_write("labels", lambda f: __import__("dedit_nb.session").session.npy_bytes(np.zeros((3, 3), np.int32))),
     "items/0-", "resize it"),
    (_write("unet", b"\x00" * 40), "weights/unet-", "not a readable safetensors file"),
    (_write("unet", lambda f: _file("unet")(f).read_bytes()[:-5]), "weights/unet-", "not a readable safetensors"),
    (lambda f: _file("tokens")(f).unlink(), "weights/tokens-", "is missing"),
])
@pytest.mark.parametrize("lock_file", [True, False], ids=["locked", "made-before-locks"])
def test_a_damaged_session_is_named_with_the_fix_and_left_as_it_is(tmp_path, photo, corrupt, names, says, lock_file):
    s = Session.create(tmp_path / "s", photo, resolution=64, multiple=16)
    _fake_weights(s)
    corrupt(tmp_path / "s")
    if not lock_file:
        (tmp_path / "s" / ".session.lock").unlink()
    before = folder_digest(tmp_path / "s")
    with pytest.raises(SessionError) as err:
        Session.open(tmp_path / "s")
    message = str(err.value)
    assert names in message and says in message, message
    assert any(fix in message for fix in ("restore", "finetune the session again", "write", "version that wrote"))
    assert folder_digest(tmp_path / "s") == before


def test_unet_weights_of_another_model_are_named_not_a_key_error(tmp_path, photo, tiny_model_dirs):
    import torch
    from safetensors.torch import save_file
    from dedit_nb import Editor, FinetuneConfig, finetune, load_model
    model = load_model(str(tiny_model_dirs["offline"]))
    s = Session.create(tmp_path / "s", photo, resolution=32, multiple=8)
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    unet_file = s.weights_file("unet")
    save_file({"mid_block.attentions.9.attn2.to_q.weight": torch.zeros(2, 2)}, str(unet_file))
    before = folder_digest(tmp_path / "s")
    with pytest.raises(SessionError, match=f"{unet_file.name}.*lacks.*finetune the session again"):
        Editor(model, Session.open(tmp_path / "s"))
    assert folder_digest(tmp_path / "s") == before


def _refuse_lock(monkeypatch, folder, error):
    """The session lock of ``folder`` fails with ``error``, as filelock's does for a user who cannot write there
    (root writes anywhere, so a chmod alone does not stop it)."""
    import os

    import filelock

    class Refused(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            if os.path.dirname(self.lock_file) == str(folder):
                raise error
            return super().acquire(*args, **kwargs)
    monkeypatch.setattr("dedit_nb.session.store.FileLock", Refused)


@contextlib.contextmanager
def read_only(monkeypatch, folder):
    """``folder`` and everything in it made unwritable for this user (for root, whom modes do not stop, its
    lock refused as it is for others), and writable again afterwards."""
    import errno
    import os
    import stat
    tree = [folder, *folder.rglob("*")]
    for path in tree:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() == 0:
        _refuse_lock(monkeypatch, folder, PermissionError(errno.EACCES, "Permission denied", str(folder)))
    try:
        yield
    finally:
        for path in tree:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("lock_file", [True, False], ids=["with-lock-file", "no-lock-file"])
def test_a_read_only_session_opens_edits_unrecorded_refuses_writes_and_copies_out(tmp_path, photo, monkeypatch,
                                                                                  lock_file, tiny_model_dirs):
    """A finetuned session in a folder the user cannot write (a shared course folder, a read-only mount) opens,
    and edits that record nothing run on it; a write is refused with the way out (copy_to) and changes
    nothing; the copy is an ordinary, writable session."""
    import stat

    from dedit_nb.edits import Editor
    from dedit_nb.finetune import FinetuneConfig, finetune
    from dedit_nb.models import load_model
    model = load_model(str(tiny_model_dirs["sd"]))
    folder = tmp_path / "shared"
    s = Session.create(folder, photo, resolution=32, multiple=model.latent_factor)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    if not lock_file:
        (folder / ".session.lock").unlink()
    with read_only(monkeypatch, folder):
        before = folder_digest(folder)
        opened = Session.open(folder)
        assert np.array_equal(opened.images[0].labels, s.images[0].labels)
        assert [i.name for i in opened.images[0].items] == ["left", "right", "top"]
        result = Editor(model, opened, progress=False, record=False).reconstruct(0, steps=2, guidance=1.0)
        assert result.images[0].shape == (h, w, 3)
        with pytest.raises(SessionError, match=r"cannot be written .*copy_to"):
            Editor(model, opened, progress=False).reconstruct(0, steps=2, guidance=1.0)
        with pytest.raises(SessionError, match=r"cannot be written .*copy_to"):
            opened.record_edit({"kind": "note"})
        assert folder_digest(folder) == before
        copy = opened.copy_to(tmp_path / "mine")
        assert all(p.stat().st_mode & stat.S_IWUSR for p in (tmp_path / "mine", *(tmp_path / "mine").rglob("*")))
        edited = Editor(model, copy, progress=False).reconstruct(0, steps=2, guidance=1.0)
        assert np.array_equal(edited.images[0], result.images[0])
        assert [r["kind"] for r in Session.open(tmp_path / "mine").history] == ["recon"]
        assert folder_digest(folder) == before


def test_a_lock_failure_that_is_not_a_permission_is_not_taken_for_a_read_only_folder(tmp_path, photo, monkeypatch):
    import errno
    Session.create(tmp_path / "s", photo, resolution=64, multiple=16)
    _refuse_lock(monkeypatch, tmp_path / "s", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        Session.open(tmp_path / "s")
