"""Edit plans: a list of operations on one image turned into what one sampling pass needs.

Each kind's planner adds its operation to a :class:`Draft` of the edit: a new prompt for an item (text,
image), a new place or mask for an item (move, reshape), an item removed or a new item added. Composing them
gives one :class:`Plan`: the target label map (:func:`masks.compose_items`: moved and reshaped items by
priority, removed items' pixels filled from the nearest kept items, added items drawn on top taking the pixels
of the items beneath), a prompt and prompt length per item, the item names, and the active region: the union
of what the operations change (the pixels whose item changed or was drawn, and the items with new prompts).

An operation that changes nothing (a move by 0, a reshape to the item's own mask, a text prompt that is the
item's own template) adds nothing to the plan, so composing it with others leaves their edit as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from . import conditioning as C
from . import masks as M
from .operations import Operation, operation_pixels
from .parameters import ParameterError
from .session import ImageEntry, Session, SessionError, unique_names


@contextlib.contextmanager
def about(parameter: str):
    """Tag a session or partition error raised inside with the ``parameter`` it is about (``exc.parameter``),
    so a notebook's check can name it."""
    try:
        yield
    except (SessionError, M.PartitionError) as exc:
        exc.parameter = getattr(exc, "parameter", parameter)
        raise


@dataclass
class Plan:
    """What one sampling pass of an edit needs."""

    labels: np.ndarray                  # the target label map: the session's items, then the added ones
    active: np.ndarray                  # the pixels regenerated (the union of what the operations change)
    prompts: list[str]
    lengths: list[int]                  # each prompt's token length
    names: list[str]                    # the items' names (added ones included)
    params: dict                        # what the manifest says of the operations (item names and indices)
    masks: dict[int, np.ndarray] = field(default_factory=dict)   # operation index -> the pixels it drew
    text: str | None = None             # what the edit asked for in words (text scores of the quality record)
    bank: list = field(default_factory=list)   # the bank items the edit puts in (dedit_nb.bank.files.BankItem)


class Draft:
    """An edit being planned: the operations' changes, collected before they compose into a :class:`Plan`."""

    def __init__(self, entry: ImageEntry, session: Session, item_prompt_length: int):
        self.entry, self.session = entry, session
        self.prompts = [it.prompt() for it in entry.items]
        self.lengths = [item_prompt_length] * len(self.prompts)
        self.item_prompt_length = item_prompt_length
        self.prompted: set[int] = set()           # items given a new prompt
        self.moves: dict[int, M.ItemMove] = {}
        self.removed: list[int] = []
        self.added: list[tuple[str, str, np.ndarray]] = []
        self.everything = False                   # a recon: every pixel regenerates
        self.params: list[dict] = []
        self.masks: dict[int, np.ndarray] = {}
        self.texts: list[str] = []
        self.bank: list = []                       # bank items put in by image and add operations

    def item(self, ref, parameter: str = "item") -> int:
        with about(parameter):
            return self.entry.item_index(ref)

    def claim(self, k: int, how: str) -> None:
        """Refuse a second change of the same kind to one item (two prompts, or a move and a removal)."""
        taken = k in self.prompted if how == "prompt" else (k in self.moves or k in self.removed)
        if taken:
            raise ParameterError("edits", f"item {self.entry.items[k].name!r} has two {how} changes in one edit; "
                                          "keep one")

    def set_prompt(self, k: int, prompt: str, length: int) -> bool:
        """Give item ``k`` a prompt; False (nothing planned) when it is the item's own."""
        self.claim(k, "prompt")
        if prompt == self.entry.items[k].prompt():
            return False
        if not (self.entry.labels == k).any():
            raise M.PartitionError(f"item {self.entry.items[k].name!r} has no pixels in image {self.entry.name!r}")
        self.prompts[k], self.lengths[k] = prompt, length
        self.prompted.add(k)
        return True

    def set_move(self, k: int, move: M.ItemMove) -> bool:
        """Move or redraw item ``k``; False when it lands exactly where it is."""
        self.claim(k, "mask")
        if np.array_equal(M.moved_mask(self.entry.labels, k, move), self.entry.labels == k):
            return False
        self.moves[k] = move
        return True

    def compose(self, priority=None) -> Plan:
        n = len(self.entry.items)
        order = None
        if priority is not None:
            order = [k for k in (self.item(p) for p in priority) if k in self.moves]
            if sorted(order) != sorted(self.moves):
                names = [self.entry.items[k].name for k in self.moves]
                raise ParameterError("priority", f"{list(priority)} must list exactly the moved and reshaped items "
                                                 f"{names}, bottom to top")
        labels, changed = M.compose_items(self.entry.labels, self.moves, order, self.removed,
                                          [mask for _, _, mask in self.added], num_items=n)
        active = changed | np.isin(labels, sorted(self.prompted)) | self.everything
        if not active.any():
            raise ParameterError("edits", "these operations change nothing (a move by 0, the item's own prompt "
                                          "or mask): change an item, or use a 'recon' operation")
        for k in self.prompted:
            if not (labels == k).any():
                raise M.PartitionError(f"item {self.entry.items[k].name!r} is given a prompt but no pixel of it "
                                       "is left after the other operations")
        names = unique_names([it.name for it in self.entry.items] + [name for name, _, _ in self.added])
        prompts = self.prompts + [prompt for _, prompt, _ in self.added]
        lengths = self.lengths + [C.TEXT_PROMPT_LENGTH] * len(self.added)
        return Plan(labels, active, prompts, lengths, names, {}, self.masks, ", ".join(self.texts) or None,
                    self.bank)


# --- one planner per kind: (draft, operation, its index) -> what the manifest says of it ------------------
def plan_recon(draft: Draft, op, i: int) -> dict:
    draft.everything = True
    return {}


def plan_text(draft: Draft, op, i: int) -> dict:
    if not op.prompt.strip():
        raise ParameterError("prompt", "a text edit needs a prompt, e.g. 'a red bag' or 'a photo of * in gold'")
    k = draft.item(op.item)
    item = draft.entry.items[k]
    if draft.set_prompt(k, item.prompt(op.prompt) if "*" in op.prompt else op.prompt, C.TEXT_PROMPT_LENGTH):
        draft.texts.append(op.prompt)
    return {"item": item.name, "item_index": k, "prompt": op.prompt}


def banked(draft: Draft, ref) -> object:
    """The bank item an operation's ``source_item_file`` names (a bank file, or one of the session's bank items)."""
    from .bank import BankFileError
    from .bank.use import source_item
    try:
        item = source_item(draft.session, ref)
    except BankFileError as exc:
        raise ParameterError("source_item_file", str(exc)) from exc
    draft.bank.append(item)
    return item


def plan_image(draft: Draft, op, i: int) -> dict:
    if op.source_item_file is not None:
        k = draft.item(op.item)
        item = banked(draft, op.source_item_file)
        length = C.TEXT_PROMPT_LENGTH if op.template else draft.item_prompt_length
        if draft.set_prompt(k, item.prompt(op.template), length) and op.template:
            draft.texts.append(op.template)
        return {"item": draft.entry.items[k].name, "item_index": k, "source_item_file": str(op.source_item_file),
                "source_item": item.name, "template": op.template}
    if op.source_item is None:
        raise ParameterError("source_item", "the image operation needs source_item (the item put in the item's "
                                            "place), or source_item_file (a bank item)")
    owner = draft.session
    with about("source_session"):
        if op.source_session is not None:
            owner = Session.open(op.source_session) if isinstance(op.source_session, str) else op.source_session
        draft.session.check_joint(owner)
    with about("source_image"):
        source = owner.image(op.source_image)
    with about("source_item"):
        sk = source.item_index(op.source_item)
    k = draft.item(op.item)
    length = C.TEXT_PROMPT_LENGTH if op.template else draft.item_prompt_length
    if draft.set_prompt(k, source.items[sk].prompt(op.template), length) and op.template:
        draft.texts.append(op.template)
    return {"item": draft.entry.items[k].name, "item_index": k, "source_image": source.name,
            "source_session": str(owner.folder) if op.source_session is not None else None,
            "source_item": source.items[sk].name, "source_item_index": sk, "template": op.template}


def plan_move(draft: Draft, op, i: int) -> dict:
    k = draft.item(op.item)
    mask = operation_pixels(op, draft.entry.labels.shape)
    with about("dx"):
        moved = draft.set_move(k, M.ItemMove(op.dx, op.dy, op.scale, mask))
    if moved and mask is not None:
        draft.masks[i] = mask
    return {"item": draft.entry.items[k].name, "item_index": k, "dx": op.dx, "dy": op.dy, "scale": op.scale,
            "mask": mask is not None}


def plan_reshape(draft: Draft, op, i: int) -> dict:
    k = draft.item(op.item)
    mask = operation_pixels(op, draft.entry.labels.shape)
    if draft.set_move(k, M.ItemMove(mask=mask)):
        draft.masks[i] = mask
    return {"item": draft.entry.items[k].name, "item_index": k, "pixels": int(mask.sum())}


def plan_remove(draft: Draft, op, i: int) -> dict:
    k = draft.item(op.item)
    draft.claim(k, "mask")
    draft.removed.append(k)
    return {"item": draft.entry.items[k].name, "item_index": k}


def plan_add(draft: Draft, op, i: int) -> dict:
    if op.source_item_file is not None:     # a bank item drawn where the mask says, its template or op.prompt
        item = banked(draft, op.source_item_file)
        mask = operation_pixels(op, draft.entry.labels.shape)
        draft.added.append((op.name, item.prompt(op.prompt or None), mask))
        draft.masks[i] = mask
        return {"name": op.name, "item_index": len(draft.entry.items) + len(draft.added) - 1,
                "source_item_file": str(op.source_item_file), "source_item": item.name, "prompt": op.prompt,
                "pixels": int(mask.sum())}
    if not op.prompt.strip() or "*" in op.prompt:
        raise ParameterError("prompt", f"a new item needs a text prompt without '*' (it has no learned tokens), "
                                       f"e.g. 'a red hat'; got {op.prompt!r}")
    mask = operation_pixels(op, draft.entry.labels.shape)
    draft.added.append((op.name, op.prompt, mask))
    draft.masks[i] = mask
    draft.texts.append(op.prompt)
    return {"name": op.name, "item_index": len(draft.entry.items) + len(draft.added) - 1, "prompt": op.prompt,
            "pixels": int(mask.sum())}


PLANNERS = {"recon": plan_recon, "text": plan_text, "image": plan_image, "move": plan_move,
            "remove": plan_remove, "add": plan_add, "reshape": plan_reshape}


def plan_edit(entry: ImageEntry, session: Session, operations: list[Operation], priority=None,
              item_prompt_length: int = C.ITEM_PROMPT_LENGTH) -> Plan:
    """One plan for ``operations`` on ``entry`` (an image of ``session``). ``priority`` lists the moved and
    reshaped items bottom to top (default: the order of the operations)."""
    draft = Draft(entry, session, item_prompt_length)
    for i, op in enumerate(operations):
        draft.params.append(PLANNERS[op.kind](draft, op, i))
    plan = draft.compose(priority)
    plan.params = manifest_params(operations, draft, priority)
    return plan


def manifest_params(operations: list[Operation], draft: Draft, priority) -> dict:
    """The manifest's ``params``: a single operation's own; moves alone as the move edit always recorded them
    (``moves`` by item name, and the ``priority`` applied); else one entry per operation."""
    names = [it.name for it in draft.entry.items]
    applied = [names[draft.item(p)] for p in priority] if priority is not None else \
        [p["item"] for p in draft.params if "dx" in p or ("pixels" in p and "name" not in p)]
    if all(op.kind == "move" for op in operations):
        return {"moves": {p["item"]: {k: p[k] for k in ("dx", "dy", "scale", "mask")} for p in draft.params},
                "priority": applied}
    if len(operations) == 1:
        return draft.params[0]
    return {"operations": [{"kind": op.kind, **p} for op, p in zip(operations, draft.params)], "priority": applied}
