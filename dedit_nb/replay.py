"""Edit requests: what every manifest records so that an edit can be run again, byte for byte.

    python -m dedit_nb.replay OUTPUT_DIR --output NEW_DIR [--session FOLDER] [--device cpu] [--record]

``manifest["request"]`` holds the operations (as dicts; a mask array is written beside the manifest as
``mask_<i>.png`` and referred to by ``mask_file``), the priority, the sampling settings with the model
profile's record, the model id, its profile and dtype, the session, its weights generation, and the seeds.
A replay on the same model and weights gives the same images byte for byte; it refuses, naming what differs,
when the session, its weights generation (a finetune since), the model or its profile or dtype are others.
The replay is written to a new folder (the rules of :mod:`dedit_nb.reruns`: never a folder of the user's,
never the edit replayed).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

from .profiles import model_facts
from .reruns import EDIT_MARKER, holds_output

REQUEST_FORMAT = 1


class ReplayError(ValueError):
    """A request that cannot be replayed here, naming what differs and the fix."""


def request_record(model, session, image: str, operations: Sequence, priority, config) -> dict:
    """The request of one edit, as JSON-ready data (see the module's notes)."""
    sampling = asdict(config)
    return {"format": REQUEST_FORMAT, "session": str(session.folder), "session_id": session.id, "image": image,
            "operations": [op.to_dict() for op in operations],
            "priority": list(priority) if priority is not None else None,
            "sampling": sampling, "seeds": [config.seed + j for j in range(config.num_images)],
            "scheduler": config.scheduler, "model_id": model.model_id,
            "model_profile": model_facts(model).profile().name, "dtype": str(model.dtype).replace("torch.", ""),
            "weights_generation": session.weights_generation}


def read_request(manifest_or_folder: Mapping | str | Path) -> tuple[dict, Path | None]:
    """The request of a manifest (a dict), or of the edit folder (or its ``manifest.json``) that holds one;
    and that folder (None for a dict), where the request's mask files are."""
    folder = None
    manifest = manifest_or_folder
    if not isinstance(manifest_or_folder, Mapping):
        path = Path(manifest_or_folder)
        folder = path.parent if path.name == EDIT_MARKER else path
        if not holds_output(folder, EDIT_MARKER):
            raise ReplayError(f"{folder} holds no edit manifest ({EDIT_MARKER} written by an edit): give the folder "
                              "an edit was saved to")
        manifest = json.loads((folder / EDIT_MARKER).read_text())
    request = manifest.get("request")
    if not isinstance(request, Mapping) or request.get("format") != REQUEST_FORMAT:
        raise ReplayError("this manifest holds no request to replay (an edit from before requests were recorded, "
                          f"or another format than {REQUEST_FORMAT}): run the edit again")
    return dict(request), folder


def check_request(request: Mapping, model, session) -> None:
    """Refuse to replay ``request`` with ``model`` and ``session`` when the images would not be the same."""
    check_session(request, session)
    check_model(request, model)


def check_session(request: Mapping, session) -> None:
    """Refuse another session, or the same with other learned weights."""
    if request["session_id"] != session.id:
        raise ReplayError(f"the request is an edit of session {request['session']} (id {request['session_id']}), "
                          f"not of {session.folder} (id {session.id}): open that session")
    if request["weights_generation"] != session.weights_generation:
        raise ReplayError(f"{session.folder} holds other learned weights (generation {session.weights_generation}) "
                          f"than the edit was sampled with ({request['weights_generation']}): it was finetuned "
                          "since, so the images would differ; replay on a copy of the session made before that")


def check_model(request: Mapping, model) -> None:
    """Refuse another model, model profile or dtype."""
    differences = []
    profile = model_facts(model).profile().name
    dtype = str(model.dtype).replace("torch.", "")
    for what, recorded, here in (("model", request["model_id"], model.model_id),
                                 ("model profile", request["model_profile"], profile),
                                 ("dtype", request["dtype"], dtype)):
        if recorded != here:
            differences.append(f"{what} {recorded!r} (this one: {here!r})")
    if differences:
        raise ReplayError(f"the edit was sampled with {', '.join(differences)}: load that model "
                          f"(load_model({request['model_id']!r}, dtype={request['dtype']!r})) to replay it")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a saved edit again from its manifest's request")
    parser.add_argument("edit", type=Path, help="the folder an edit was saved to (holding manifest.json)")
    parser.add_argument("--output", type=Path, required=True, help="where the replay is written (a new folder)")
    parser.add_argument("--session", type=Path, default=None, help="the session folder, if it moved")
    parser.add_argument("--device", default=None, help="device to load the model on (default: CUDA, MPS, CPU)")
    parser.add_argument("--record", action="store_true", help="record the replay in the session's history")
    args = parser.parse_args(argv)
    from .edits import Editor
    from .models import load_model
    from .session import Session, SessionError
    try:
        request, folder = read_request(args.edit)
        session_dir = args.session or Path(request["session"])
        if not (session_dir / "session.json").is_file():
            raise ReplayError(f"the session {session_dir} of this edit is missing: pass --session FOLDER")
        session = Session.open(session_dir)
        check_session(request, session)             # before the model loads
        model = load_model(request["model_id"], device=args.device, dtype=request["dtype"])
        if args.output.resolve() == folder.resolve():
            raise ReplayError(f"{args.output} is the edit being replayed: write the replay to another folder")
        out = Editor(model, session, progress=False, record=args.record).replay(folder).save(args.output)
    except (ReplayError, SessionError) as exc:
        print(f"replay refused: {exc}", file=sys.stderr)
        return 2
    recorded = json.loads((folder / EDIT_MARKER).read_text())["files"]["images"]
    same = [(folder / name).read_bytes() == (out / name).read_bytes() for name in recorded]
    for name, equal in zip(recorded, same):
        print(f"{name}: {'identical' if equal else 'DIFFERS'}")
    print(f"replay written to {out}")
    return 0 if all(same) else 1


if __name__ == "__main__":
    raise SystemExit(main())
