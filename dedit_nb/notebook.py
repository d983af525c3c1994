"""What the notebooks call: parameter checks that fail early and name the parameter, and the headless
step of each notebook, so the notebooks stay thin and this logic is tested.

Each notebook's first code cell after its parameters calls :func:`check_parameters` with its name and its
globals: every parameter is type- and range-checked (``steps=1.5``, ``guidance='high'`` and papermill's
``-r steps 10``, a string, are refused by name), and a name papermill injected that the parameters cell
does not have (a misspelling such as ``strenght``) fails, naming the closest known one, before anything is
loaded or written.
"""
from __future__ import annotations

import ast
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .domain import MIN_RECON_PSNR, domain_notes, psnr, reconstruction_note
from .edits import EDIT_KINDS, Editor, EditResult, run_edit
from .finetune import finetune
from .masks import PartitionError
from .models import DEditModel
from .operations import flat_operation, operation_from_dict, operations_from
from .parameters import (EDITS, FINETUNE, OPERATIONS, SAMPLING, SEGMENTATION, Field, OneLineError, ParameterError,
                         closest)
from .plans import plan_edit
from .profiles import Resolved, model_facts, resolve
from .reruns import choose_folder
from .sampler import MAX_SEED, SCHEDULERS, SamplingConfig
from .session import Session, SessionError

if TYPE_CHECKING:
    from .models import DEditModel


class NotebookStop(OneLineError, RuntimeError):
    """A notebook stopped on purpose, saying why and what to do (a photo for the offline model, an
    interrupted finetune, a session that is not finetuned yet)."""


def _text(name: str, optional: bool = False) -> Field:
    return Field(name, "text", optional=optional)


def _flag(name: str) -> Field:
    return Field(name, "bool", False, widget="checkbox")


def _fields(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


# A notebook's parameters, in the order of its parameters cell: the fields of the API's schemas
# (dedit_nb.parameters) and a few of the notebooks' own (folders, model, switches). 03's single-edit
# parameters are the operations' fields, each optional (an edit leaves the others' unused).
EDIT_FIELDS = {f.name: replace(f, optional=True) for schema in OPERATIONS.values() for f in schema}
NOTEBOOK_PARAMETERS: dict[str, dict[str, Field]] = {
    "01_segment": _fields(_text("image_path", optional=True), _text("session_dir"), _text("model"), *SEGMENTATION,
                          _flag("overwrite"), _flag("interactive")),
    "02_finetune": _fields(
        _text("session_dir"), _text("model"),
        *(FINETUNE[n] for n in ("num_tokens", "stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr", "lora",
                                "lora_lr", "batch_size")),
        Field("extra_sessions", "paths", [], "sessions finetuned jointly with this one"), FINETUNE["seed"],
        replace(SAMPLING["steps"], name="recon_steps"), replace(SAMPLING["guidance"], name="recon_guidance"),
        _text("device", optional=True), _flag("resume"), _flag("force"), _flag("auto_memory")),
    "03_edit": _fields(
        _text("session_dir"), _text("model"), Field("edit", "text", "text", choices=EDIT_KINDS),
        *(EDIT_FIELDS[n] for n in ("item", "prompt", "dx", "dy", "scale", "source_session", "source_image",
                                   "source_item", "source_item_file", "name", "box", "mask_file")), EDITS,
        *(SAMPLING[n] for n in ("strength", "guidance", "steps", "edge_thickness", "seed", "num_images",
                                "scheduler")),
        _text("output_dir"), _flag("overwrite"), _text("device", optional=True), _flag("auto_memory"),
        _flag("interactive"), _text("batch_grid", optional=True)),
}
# Parameters a model profile sets (dedit_nb.profiles): None, their default, takes the profile's value. Each
# maps to the profile setting it stands for (its field's ``profile``).
PROFILE_PARAMETERS: dict[str, dict[str, str]] = {
    notebook: {name: f.profile for name, f in spec.items() if f.profile} for notebook, spec in NOTEBOOK_PARAMETERS.items()}
RECON_CHECK = "reconstruction-check"   # the history record of 02's reconstruction PSNR
PAPERMILL_MARK = "# Parameters"        # the comment papermill's Python translator opens its injected cell with


def check_parameters(notebook: str, namespace: dict) -> None:
    """Check a notebook's parameters in ``namespace`` (its ``globals()``): names papermill injected must be
    parameters of the notebook, and every parameter must have its type and range."""
    spec = NOTEBOOK_PARAMETERS[notebook]
    injected = injected_names(namespace)
    for name in injected:
        if name not in spec:
            raise ParameterError(name, f"{notebook} has no such parameter{closest(name, list(spec))}")
    check_values(spec, {name: namespace.get(name) for name in spec}, papermill=bool(injected))


def check_values(spec: dict[str, Field], values: dict, papermill: bool = False) -> None:
    """Check named values against ``spec``; a name not in it fails, naming the closest one. ``papermill``:
    the values came from papermill's command line (its -r/-p advice applies)."""
    for name, value in values.items():
        if name not in spec:
            raise ParameterError(name, f"unknown parameter{closest(name, list(spec))}")
        spec[name].check(value, papermill)


def injected_names(namespace: dict) -> list[str]:
    """Names assigned by the cells papermill injected, as the kernel executed them (IPython's ``In``)."""
    names = []
    for source in namespace.get("In") or []:
        if isinstance(source, str) and source.lstrip().startswith(PAPERMILL_MARK):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            names += [t.id for node in tree.body if isinstance(node, ast.Assign)
                      for t in node.targets if isinstance(t, ast.Name)]
    return names


def resolve_parameters(notebook: str, model: str | DEditModel, namespace: dict) -> Resolved:
    """The notebook's parameters that a model profile sets (:data:`PROFILE_PARAMETERS`), read from
    ``namespace``: each None takes the profile of ``model`` (an id, folder or loaded model), any other value
    stays. ``str()`` of the result is one line naming each value and where it came from."""
    settings = PROFILE_PARAMETERS[notebook]
    return resolve(model, {name: namespace.get(name) for name in settings}, settings)


def check_session_model(session: Session, model: str) -> None:
    """03's check before any model loads: the session was finetuned to the end, on ``model``."""
    check_finetuned(session)
    if session.model_id != model:
        trained, asked = (model_facts(m).profile().title for m in (session.model_id, model))
        raise ParameterError("model", f"this session was finetuned on {session.model_id!r} ({trained}), not "
                                      f"{model!r} ({asked}): set model={session.model_id!r}, or finetune the "
                                      f"session on {model!r} in 02_finetune (resume=False)")


def segmenter_kwargs(segmenter: str, num_items: int = 6, checkpoint: str | None = None,
                     panoptic_model: str | None = None, detector: str | None = None, phrases: str = "") -> dict:
    """Keyword arguments of ``segment`` for a segmenter chosen by name, checked."""
    SEGMENTATION.check({"segmenter": segmenter, "num_items": num_items}, resolved=True)   # the schema's checks
    if segmenter == "offline":
        return {"num_items": int(num_items)}
    if segmenter in ("sam", "grounded") and not checkpoint:
        raise ParameterError("checkpoint", f"segmenter {segmenter!r} needs a SAM .pth checkpoint path "
                                           "(sam_vit_b_01ec64.pth from the segment-anything README)")
    if segmenter in ("sam", "grounded") and not Path(checkpoint).is_file():
        raise ParameterError("checkpoint", f"{checkpoint} is not a file; download a SAM checkpoint "
                                           "(sam_vit_b_01ec64.pth from the segment-anything README) and pass its path")
    if segmenter == "sam":
        return {"checkpoint": checkpoint}
    if segmenter == "panoptic":
        return {"model": panoptic_model or "facebook/mask2former-swin-base-coco-panoptic"}
    if not phrases.strip():
        raise ParameterError("phrases", "segmenter 'grounded' needs phrases such as 'bag. table.'")
    return {"phrases": phrases, "checkpoint": checkpoint, "detector": detector or "IDEA-Research/grounding-dino-tiny"}


def check_edit_params(session: Session, edit: str, item=None, prompt: str = "", source_session: str | None = None,
                      source_item=None, image=0, source_image=0, edits: Sequence | None = None,
                      priority: Sequence | None = None, source_item_file: str | None = None,
                      **sampling) -> SamplingConfig:
    """Check an edit's parameters against the session before any model is loaded: the operations (``edits``,
    else the single edit of the flat parameters) by their schemas and, once the session is finetuned, by
    planning them (items, source items, masks), and the sampling settings; returns the one
    :class:`SamplingConfig` of the edit (pass it on as ``config``)."""
    try:
        if edits:
            operations = operations_from(edits)
        else:
            operations = [operation_from_dict(flat_operation(
                edit, item=item, prompt=prompt, source_session=source_session, source_image=source_image,
                source_item=source_item, source_item_file=source_item_file))]
        if session.has_weights:
            plan_edit(session.image(image), session, operations, priority)
    except (SessionError, PartitionError) as exc:
        raise ParameterError(getattr(exc, "parameter", "edits" if edits else "item"), str(exc)) from exc
    unknown = [name for name in sampling if name not in SAMPLING]
    if unknown:
        raise ParameterError(unknown[0], f"unknown parameter{closest(unknown[0], SAMPLING.names)}")
    try:
        return SamplingConfig(**sampling)
    except ParameterError as exc:       # named as the notebook's parameter, not SamplingConfig's field
        raise ParameterError(exc.name, exc.message) from None


def edit_recording(session: Session) -> tuple[bool, str | None]:
    """Whether an edit can be recorded in the session's history, and else a one-line note: a session in a
    folder this user cannot write is still edited (``record=False``), its results go to ``output_dir`` only."""
    if session.writable:
        return True, None
    return False, (f"{session.folder} cannot be written: the edit runs and is saved in output_dir, but the session's "
                   "history was not updated (to record edits, work on a copy: session.copy_to('my-session')).")


def headless_edit(model: DEditModel, session: Session, edit: str, output_dir: str | Path, item=None,
                  prompt: str = "", dx: float = 0.0, dy: float = 0.0, scale: float = 1.0,
                  source_session: str | None = None, source_image=0, source_item=None, image=0,
                  progress: bool = True, record: bool = True, edits: Sequence | None = None,
                  priority: Sequence | None = None, config: SamplingConfig | None = None,
                  source_item_file: str | None = None, **sampling) -> EditResult:
    """One edit from flat parameters, or the operations of ``edits`` (a list of operation dicts) in one
    sampling pass; writes images, regions and manifest.json into ``output_dir``, and records it in the
    session's history when ``record``. ``config``: the :class:`SamplingConfig` :func:`check_edit_params`
    returned (else it is made from ``sampling``)."""
    if config is None:
        config = check_edit_params(session, edit, item, prompt, source_session, source_item, image, source_image,
                                   edits, priority, source_item_file, **sampling)
    elif sampling:
        raise TypeError(f"give the sampling settings as config or as keywords, not both ({sorted(sampling)})")
    editor = Editor(model, session, progress=progress, record=record)
    result = run_edit(editor, edit, image=image, item=item, prompt=prompt, dx=dx, dy=dy, scale=scale,
                      source_image=source_image, source_item=source_item, source_session=source_session,
                      source_item_file=source_item_file, edits=edits, priority=priority, config=config)
    result.save(output_dir)
    return result


def open_sessions(paths: Sequence[str]) -> list[Session]:
    """The sessions of the ``extra_sessions`` parameter."""
    return [_open_session("extra_sessions", p) for p in paths or []]


def _open_session(parameter: str, path: str | Path) -> Session:
    try:
        return Session.open(path)
    except SessionError as exc:
        raise ParameterError(parameter, f"{exc} (01_segment makes one)") from exc


# --- what the notebooks say between their steps (issue 23.3, 23.4) ----------------------------------------

def choose_session_folder(session_dir: str | Path, overwrite: bool = False) -> tuple[Path, str | None]:
    """01's output folder (see :func:`reruns.choose_folder`); when a rerun goes to a new numbered folder, the
    note also names what to set in 02 and 03, which still default to the first folder."""
    folder, note = choose_folder(session_dir, overwrite)
    if note:
        note += (f' 02_finetune and 03_edit default to the first folder: set session_dir="{folder.as_posix()}" '
                 "there to use this one.")
    return folder, note


def check_finetuned(session: Session) -> None:
    """03's check: the session has finished finetune weights, said before any model is loaded."""
    state = session.finetune_state or {}
    if not session.has_weights:
        raise ParameterError("session_dir", f"{session.folder} is not finetuned yet: run 02_finetune on it first")
    if not state.get("done", False):
        raise ParameterError("session_dir", f"the finetune of {session.folder} did not finish: run 02_finetune "
                                            "on it again to resume it")


def check_domain(sessions: Sequence[Session], model: str | DEditModel, force: bool = False,
                 notebook: str = "02_finetune") -> list[str]:
    """The domain notes of ``sessions`` for ``model`` (:func:`domain.domain_notes`); in 02 a flagged image
    stops the notebook before training unless ``force``."""
    notes = [note for s in sessions for note in domain_notes(s, model, notebook=notebook)]
    if notes and notebook == "02_finetune" and not force:
        raise NotebookStop(f"stopped before training: {notes[0]} To train anyway, set force=True.")
    return notes


def finetune_in_notebook(model: DEditModel, session: Session, config, extra_sessions: Sequence[Session] = (),
                         resume: bool = True):
    """``finetune`` as 02 runs it: an interrupt (the kernel's stop button) ends with one line saying where
    the weights were saved and how to resume, instead of a traceback from inside autograd."""
    try:
        return finetune(model, session, config, extra_sessions=list(extra_sessions), resume=resume)
    except KeyboardInterrupt:
        state = Session.open(session.folder).finetune_state
        where = (f"saved at stage {state['stage']} step {state['step']}; run the cell again to resume" if state
                 else "nothing saved yet; run the cell again to start")
        raise NotebookStop(f"interrupted: {where}") from None


def record_reconstruction(session: Session, original, reconstructed,
                          model: str | DEditModel | None = None) -> str | None:
    """Record the reconstruction's PSNR in the session's history (03 repeats it before editing); returns
    :func:`domain.reconstruction_note`'s warning, or None."""
    value = psnr(original, reconstructed)
    session.record_edit({"kind": RECON_CHECK, "psnr": round(value, 2) if math.isfinite(value) else None})
    return reconstruction_note(original, reconstructed, model)


def edit_notes(session: Session, model) -> list[str]:
    """What 03 says before it samples: the domain notes, and how well the finetune reconstructed the image."""
    notes = check_domain([session], model, notebook="03_edit")
    checks = [h for h in session.history if h.get("kind") == RECON_CHECK]
    if checks:
        value = checks[-1].get("psnr")
        shown = "identical" if value is None else f"PSNR {value:.1f} dB"
        low = value is not None and value < MIN_RECON_PSNR
        notes.append(f"02_finetune's reconstruction of this session: {shown}"
                     + (f", below {MIN_RECON_PSNR:.0f} dB: edits will not look like the image" if low else ""))
    return notes
