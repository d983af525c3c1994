"""Hostile-tester cases (issue 27): nothing outside what the project wrote is touched, non-finite numbers
are refused, interrupts and deleted folders leave consistent sessions, inputs that would hang are refused."""
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
