"""The session: one folder that carries an edit project through every notebook.

Layout::

    session.json              what everything is (format, images, items, model, weights, finetune, history)
    images/<i>-original-<hash>.<ext>  the user's file, byte for byte (never modified)
    images/<i>-working-<hash>.png     the image at the working size the model sees
    items/<i>-<hash>.npy       label map of image i (int32, one item index per pixel)
    weights/<kind>-<hash>.safetensors  learned item tokens, trained UNet parameters, optimizer state
    .session.lock             taken by every write (and by reads of several files)

Every write is a read-modify-write under the folder's lock: ``session.json`` is read again, this writer's
change is applied to it (history records are appended to what is there; any other change must start from
what is there, or the write is refused with the fix), the new content-named data files are written, then
``session.json`` atomically, then files nothing refers to are deleted. Several processes can therefore edit,
record and finetune the same session, and a crash at any point leaves the previous session intact.

The package, bottom to top (each module imports only those before it): :mod:`.items` (the records),
:mod:`.schema` (session.json read and checked into typed records, the data files loaded), :mod:`.store` (the
lock, atomic writes, the merge, garbage collection), :mod:`.checkpoints` (joint finetune checkpoints) and
:mod:`.core` (the ``Session`` class).
"""
from .checkpoints import save_joint_weights, settle_joint
from .core import Session
from .items import DEFAULT_TEMPLATE, ImageEntry, Item, SessionError, unique_names
from .schema import FORMAT, SESSION_FILE
from .store import LOCK_FILE, atomic_write_bytes, npy_bytes, png_bytes, session_lock

__all__ = ["Session", "SessionError", "Item", "ImageEntry", "unique_names", "DEFAULT_TEMPLATE", "FORMAT",
           "SESSION_FILE", "LOCK_FILE", "atomic_write_bytes", "npy_bytes", "png_bytes", "session_lock",
           "save_joint_weights", "settle_joint"]
