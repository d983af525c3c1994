"""The records of a session: its images at their working size and their items (name, tokens, prompt)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DEFAULT_TEMPLATE = "*"


class SessionError(RuntimeError):
    """A session folder or an operation on it that is not valid, with the fix."""


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with each repeated one numbered (``cup``, ``cup-2``...): an edit names its item, so one name
    must not stand for two items."""
    taken: set[str] = set()
    unique = []
    for name in names:
        fresh, n = name, 2
        while fresh in taken or (fresh != name and fresh in names):
            fresh, n = f"{name}-{n}", n + 1
        taken.add(fresh)
        unique.append(fresh)
    return unique


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())[:12] or "item"


@dataclass
class Item:
    """One item of an image: a name, its learned-prompt tokens, and a prompt template (``*`` = tokens)."""

    name: str
    tokens: list[str] = field(default_factory=list)
    template: str = DEFAULT_TEMPLATE

    def prompt(self, template: str | None = None) -> str:
        if not self.tokens:
            raise SessionError(f"item {self.name!r} has no learned tokens yet; finetune the session first")
        tpl = template if template is not None else self.template
        return tpl.replace("*", " ".join(self.tokens)) if "*" in tpl else tpl


@dataclass
class ImageEntry:
    """An image of the session at its working size, and its items."""

    name: str
    original_file: str
    working: np.ndarray                     # uint8 (H, W, 3)
    labels: np.ndarray                      # int32 (H, W)
    items: list[Item]
    working_file: str = ""                  # set once the working image is written
    fit: dict = field(default_factory=dict)  # how the original became the working image (images.WorkingFit)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.working.shape[1]), int(self.working.shape[0])

    def item_mask(self, item: int) -> np.ndarray:
        return self.labels == item

    def item_index(self, item: int | str) -> int:
        """An item by index or by name."""
        if isinstance(item, str):
            matches = [k for k, it in enumerate(self.items) if it.name == item]
            if not matches:
                raise SessionError(f"image {self.name!r} has no item {item!r}; items: {[i.name for i in self.items]}")
            if len(matches) > 1:     # a session written before names were kept unique
                raise SessionError(f"image {self.name!r} has {len(matches)} items named {item!r} (indexes {matches}); "
                                   "name the item by its index, or rename one (rename_item)")
            return matches[0]
        if not 0 <= int(item) < len(self.items):
            raise SessionError(f"image {self.name!r} has items 0..{len(self.items) - 1}; got {item}")
        return int(item)
