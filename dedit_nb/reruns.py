"""Reruns of a notebook into a folder that already holds its earlier output: by default the run goes to a new
numbered folder beside it (``session_a-2``, ``session_a-3``...) and says so in one line; ``overwrite=True``
replaces the earlier output instead. A folder holding anything else (the user's files, no output of ours) is
never written into, not even with ``overwrite=True``: the run goes to the next numbered folder as well.
Nothing is ever silently overwritten, and nothing fails with a traceback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SESSION_MARKER = "session.json"
EDIT_MARKER = "manifest.json"
BATCH_MARKER = "report.json"
# the keys each marker file of ours holds: a file of that name without them is the user's
MARKER_KEYS = {SESSION_MARKER: {"format", "id", "images"}, EDIT_MARKER: {"kind", "files"},
               BATCH_MARKER: {"runs", "ok", "failed"}}
# what may already be in a folder before the output lands there: a batch run's executed notebook and record
# (papermill writes the notebook before the run's edit starts), a session folder's lock file
FORERUNNERS = frozenset({"notebook.ipynb", "run.json", ".session.lock"})


def holds_output(folder: str | os.PathLike, marker: str) -> bool:
    """Whether ``folder`` holds a ``marker`` file written by this project (a JSON object with its keys)."""
    path = Path(folder) / marker
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and MARKER_KEYS.get(marker, set()) <= set(data)


def choose_folder(folder: str | os.PathLike, overwrite: bool = False, marker: str = SESSION_MARKER,
                  what: str = "a session") -> tuple[Path, str | None]:
    """Where this run writes, and a one-line note when that is not ``folder`` (else None).

    ``folder`` is used when it does not exist or is empty, or when it holds our ``marker`` (an earlier run's
    output) and ``overwrite`` is set. Otherwise the first ``<folder>-<n>`` (n = 2, 3, ...) that does not exist
    is chosen.
    """
    folder = Path(folder)
    ours = holds_output(folder, marker)
    if not folder.exists() or (folder.is_dir() and not ours and
                               all(p.name in FORERUNNERS for p in folder.iterdir())):
        return folder, None
    if ours and overwrite:
        return folder, None
    if folder.name in ("", ".", ".."):
        folder = folder.resolve()   # '.' and '..' have no name to number; other paths stay as the user gave them
    n = 2
    while folder.with_name(f"{folder.name}-{n}").exists() or folder.with_name(f"{folder.name}-{n}").is_symlink():
        n += 1
    fresh = folder.with_name(f"{folder.name}-{n}")
    if ours:
        return fresh, (f"{folder} already holds {what}: this run writes {fresh} instead "
                       f"(pass overwrite=True to replace the earlier one).")
    return fresh, (f"{folder} holds files this project did not write (no {marker} of ours): this run writes "
                   f"{fresh} instead (a folder of yours is never written into).")
