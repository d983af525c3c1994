"""Sessions: create, open, save atomically, refuse bad input without touching the folder."""
import hashlib

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
    assert (entry.labels == 0).all() and [i.label for i in entry.items] == ["image"]


def test_roundtrip_of_items_and_history(tmp_path, photo):
    s = Session.create(tmp_path / "s", photo, resolution=128, multiple=32)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"], templates=["*", "a photo of *", "*"])
    s.add_image(photo[::-1], name="flipped")
    s.record_edit({"kind": "recon"})
    again = Session.open(tmp_path / "s")
    assert np.array_equal(again.images[0].labels, s.images[0].labels)
    assert [i.label for i in again.images[0].items] == ["left", "right", "top"]
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
    import dedit_nb.session as S
    real = S.os.replace

    def crash(src, dst):
        if str(dst).endswith("session.json"):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(S.os, "replace", crash)
    with pytest.raises(OSError):
        s.set_items(0, three_item_labels(h, w), ["a", "b", "c"])
    monkeypatch.setattr(S.os, "replace", real)
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
