"""Joint checkpoints: a joint finetune saves each checkpoint in two phases (:func:`save_joint_weights`): first
as ``pending`` in every member, then as the current weights in every member; :func:`settle_joint` brings
members that a kill left between the phases to the newest checkpoint every member holds. Both work through
the sessions' public operations."""
from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Sequence

from .items import SessionError

if TYPE_CHECKING:
    from .core import Session


def save_joint_weights(sessions: Sequence[Session], tensors: dict[str, dict], model_id: str, meta: dict,
                       finetune_state: dict | None) -> None:
    """Save one checkpoint into every member of a (joint) finetune, all or nothing: each member first
    stores it as ``pending``, then each makes it current. The checkpoint carries a new generation id, so
    :func:`settle_joint` can tell after a kill which checkpoint every member holds."""
    from safetensors.torch import save as st_save
    blobs = {kind: st_save({k: v.detach().cpu().contiguous() for k, v in tdict.items()})
             for kind, tdict in tensors.items() if tdict}
    generation = secrets.token_hex(8)
    state = {**(finetune_state or {}), "generation": generation}
    for s in sessions:
        s.save_pending(blobs, {**meta, "model_id": model_id, "finetune": state})
    for s in sessions:
        s.promote_pending()


def _generation(info: dict | None) -> str | None:
    return ((info or {}).get("finetune") or {}).get("generation")


def settle_joint(sessions: Sequence[Session]) -> list[Session]:
    """Bring the members of a joint finetune to the newest checkpoint that every one of them holds (a kill
    between two members' saves leaves one a checkpoint ahead), and return them in the order they were
    finetuned in (that order fixes the token initialisation, so a resume equals an uninterrupted run)."""
    sessions = list(sessions)
    for s in sessions:
        s.reload()                     # what other processes (or a kill) left
    given = {s.id for s in sessions}
    recorded = [j for s in sessions for info in (s.weights_meta, s.pending) if info
                for j in info.get("joint", [])]
    if recorded and {j["id"] for j in recorded} != given:
        folders = sorted({j["folder"] for j in recorded})
        raise SessionError(f"this session's finetune was started with other sessions ({folders}); pass the "
                           "same extra_sessions, or resume=False to start over")
    held = [{s.weights_generation, _generation(s.pending)} - {None} for s in sessions]
    complete = set.intersection(*held) if held else set()
    for s in sessions:
        pending = _generation(s.pending)
        if pending is not None and pending in complete:
            s.promote_pending()
        elif pending is not None:          # written by a save that did not reach every member
            s.drop_pending()
    checkpoints = {json.dumps({k: (s.finetune_state or {}).get(k) for k in ("generation", "stage", "step", "done")})
                   for s in sessions}
    if len(checkpoints) > 1:
        raise SessionError("the jointly finetuned sessions " + ", ".join(str(s.folder) for s in sessions)
                           + " hold different checkpoints (saved by a version without joint checkpoints, or "
                           "changed by hand); finetune them again with resume=False")
    order = [j["id"] for j in recorded]
    return sorted(sessions, key=lambda s: order.index(s.id) if s.id in order else len(order))
