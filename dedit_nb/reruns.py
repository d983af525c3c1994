"""Reruns of a notebook into a folder that already holds its earlier output: by default the run goes to a new
numbered folder beside it (``session_a-2``, ``session_a-3``...) and says so in one line; ``overwrite=True``
replaces the earlier output instead. Nothing is ever silently overwritten, and nothing fails with a traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

SESSION_MARKER = "session.json"
EDIT_MARKER = "manifest.json"


def choose_folder(folder: str | os.PathLike, overwrite: bool = False, marker: str = SESSION_MARKER,
                  what: str = "a session") -> tuple[Path, str | None]:
    """Where this run writes, and a one-line note when that is not ``folder`` (else None).

    ``folder`` is used when it does not hold ``marker`` (an earlier run's output), or when ``overwrite``.
    Otherwise the first ``<folder>-<n>`` (n = 2, 3, ...) that does not exist is chosen.
    """
    folder = Path(folder)
    if overwrite or not (folder / marker).exists():
        return folder, None
    if folder.name in ("", ".", ".."):
        folder = folder.resolve()   # '.' and '..' have no name to number; other paths stay as the user gave them
    n = 2
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    fresh = folder.with_name(f"{folder.name}-{n}")
    return fresh, (f"{folder} already holds {what}: this run writes {fresh} instead "
                   f"(pass overwrite=True to replace the earlier one).")
