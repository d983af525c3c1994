"""The session folder's transaction: its lock, atomic writes, the content names of staged data files, the
merge of one writer's change into session.json as it is on disk, copies of the folder, and the deletion of
data files nothing refers to (and of temporaries of killed writes). Only files this project names are ever
deleted."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from .items import SessionError
from .schema import DATA_FOLDERS, SESSION_FILE, _check_session

LOCK_FILE = ".session.lock"
# what making or opening the lock file fails with in a folder the user may read but not write
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
LOCK_TIMEOUT = 600.0            # seconds a writer waits for another (a large weights save takes seconds)
HISTORY = "history"             # the one key merged by appending; every other key is session state


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the process's umask."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part. The file
    gets the permissions of any new file under the user's umask (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def session_lock(folder: Path, reading: bool = False):
    """The folder's write lock (shared by every process and thread; re-entrant within one thread); yields
    whether it is held. A folder the lock file cannot be made in (read-only: a shared course folder, a
    mounted drive) cannot be written; ``reading`` then goes on without the lock, since session.json and the
    data files are each replaced atomically and :func:`_check_session` refuses a view that misses a file."""
    lock = FileLock(str(Path(folder) / LOCK_FILE), timeout=LOCK_TIMEOUT, is_singleton=True)
    try:
        lock.acquire()
    except Timeout as exc:
        raise SessionError(f"{folder} stayed locked by another process for {LOCK_TIMEOUT:.0f} s (a finetune "
                           "saving a large checkpoint?); try again once it is done") from exc
    except OSError as exc:
        if exc.errno not in UNWRITABLE:     # a full disk, no flock on the file system, ...: not read-only
            raise
        if not reading:
            raise SessionError(f"{folder} cannot be written ({exc.strerror or exc}); work on a copy in a folder "
                               f"you can write: Session.open({str(folder)!r}).copy_to('my-session') (changes not "
                               "saved here are not in the copy: make them again there)") from exc
    else:
        try:
            yield True
        finally:
            lock.release()
        return
    yield False     # outside the except block, so an error of the caller's is not chained to the lock's


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as .npy bytes (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    """A uint8 image array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _check_new_folder(folder: Path, overwrite: bool) -> None:
    if (folder / SESSION_FILE).exists() and not overwrite:
        raise SessionError(f"{folder} already holds a session; open it with Session.open or pass overwrite=True")
    if folder.exists() and not (folder / SESSION_FILE).exists() and any(
            p.name != LOCK_FILE for p in folder.iterdir()):
        raise SessionError(f"{folder} exists and is not an empty folder or a session; choose another folder")



# the names this session gives its data files (:func:`_staged_name`) and their temporaries (atomic_write_bytes):
# only those are ever deleted; anything else in a data folder is the user's
OWN_FILE = {"images": re.compile(r"\d+-(original|working)-[0-9a-f]{16}(\.[^./]+)?"),
            "items": re.compile(r"\d+-[0-9a-f]{16}\.npy"),
            "weights": re.compile(r"[a-z]+-[0-9a-f]{16}\.safetensors")}
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")
_told_left_alone: set[Path] = set()


def _staged_name(prefix: str, suffix: str, blob: bytes) -> str:
    """The name of the data file holding ``blob``, ``<prefix>-<hash><suffix>``: same content, same file."""
    return f"{prefix}-{hashlib.sha1(blob).hexdigest()[:16]}{suffix}"


def _own_files(folder: Path, sub: str) -> list[Path]:
    """The regular files of data folder ``sub`` that this project names (data files and temporaries of its
    writes). A data folder that is a symlink is not searched: it may lead to a folder of the user's."""
    path = folder / sub
    if path.is_symlink():
        _tell_once(path, f"{path} is a link (to {os.path.realpath(path)}); files there are never deleted, so data "
                         "files this session no longer uses stay there")
        return []
    if not path.is_dir():
        return []
    own, others = [], []
    for f in path.iterdir():
        temporary = TEMPORARY.fullmatch(f.name)
        name = temporary["name"] if temporary else f.name
        ours = OWN_FILE[sub].fullmatch(name) is not None
        (own if ours and stat.S_ISREG(f.lstat().st_mode) else others).append(f)
    if others:
        names = sorted(f.name for f in others)
        _tell_once(path, f"{path} holds {len(others)} entries this session did not write ({', '.join(names[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); they are left alone")
    return own


def _tell_once(path: Path, message: str) -> None:
    if path not in _told_left_alone:
        _told_left_alone.add(path)
        warnings.warn(message, stacklevel=4)


def _remove_stale_temporaries(folder: Path) -> None:
    """Hidden ``.tmp`` files are written under the lock, so while it is held any left are from killed saves
    (of ``session.json`` in the root, of data files in the data folders)."""
    root = [f for f in folder.glob(f".{SESSION_FILE}.*.tmp") if TEMPORARY.fullmatch(f.name)]
    for f in root + [f for sub in DATA_FOLDERS for f in _own_files(folder, sub) if TEMPORARY.fullmatch(f.name)]:
        if stat.S_ISREG(f.lstat().st_mode):
            f.unlink()


def _merge(folder: Path, base: dict | None, overwrite: bool, disk: dict | None, ours: dict) -> dict:
    """session.json as it is on disk with this writer's change applied: records added to the history
    since this session was read are appended; any other change replaces the state, and is refused when
    another process changed the state too (a finetune and a re-segmentation at once, say)."""
    path = folder / SESSION_FILE
    if disk is None and base is not None:
        _refuse_gone(folder)
    if disk is None:
        return ours
    if base is None:
        if not overwrite:
            raise SessionError(f"{folder} already holds a session; open it with Session.open or pass "
                               "overwrite=True")
        return ours
    if disk.get("id") != base["id"]:
        raise SessionError(f"{path} now holds another session (id {disk.get('id')!r}, not {base['id']!r}), "
                           "created after this one was opened; open it again")
    ours_changed, disk_changed = _state(ours) != _state(base), _state(disk) != _state(base)
    if ours_changed and disk_changed and _state(ours) != _state(disk):
        changed = sorted(k for k in set(disk) | set(base) if k != HISTORY and disk.get(k) != base.get(k))
        raise SessionError(f"{path} was changed by another process since this session was opened "
                           f"({', '.join(changed)}); this change was not saved: open the session again "
                           "(Session.open) and redo it")
    merged = dict(_state(ours) if ours_changed else _state(disk))
    merged[HISTORY] = list(disk.get(HISTORY, [])) + ours[HISTORY][len(base[HISTORY]):]
    return merged


def _refuse_gone(folder: Path) -> None:
    raise SessionError(f"{folder} no longer holds this session (its folder or session.json was deleted or "
                       "moved since it was opened); nothing was written: put the folder back, or open the "
                       "session where it is now")


def _copy_folder(source: Path, folder: Path) -> None:
    """Copy the session folder ``source`` to the new folder ``folder`` (see ``Session.copy_to``)."""
    if folder.exists() or folder.is_symlink():
        raise SessionError(f"{folder} exists; copy into a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".copy"))
    try:
        with session_lock(source, reading=True):
            shutil.copytree(source, staging, ignore=shutil.ignore_patterns(LOCK_FILE, ".*.tmp"),
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
        for path in (staging, *staging.rglob("*")):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        _check_session(staging)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _state(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != HISTORY}


def _referenced(data: dict) -> set[str]:
    refs = {e[k] for e in data["images"] for k in ("labels", "working", "original")}
    for key in ("weights", "pending"):
        if data.get(key):
            refs |= set(data[key]["files"].values())
    return refs | {entry["file"] for entry in data.get("bank", [])}


def _collect_garbage(folder: Path, data: dict) -> None:
    """Delete the data files this session wrote that ``data`` (session.json as just written, under the lock)
    no longer refers to; nothing else (see :func:`_own_files`)."""
    referenced = _referenced(data)
    for sub in DATA_FOLDERS:
        for f in _own_files(folder, sub):
            if f"{sub}/{f.name}" not in referenced and not TEMPORARY.fullmatch(f.name):
                f.unlink()
