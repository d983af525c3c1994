"""Typed schemas of every parameter set, defined once: sampling, finetune, segmentation and each edit operation.

A :class:`Field` says what one parameter may be (its type, default, range or choices), what it means (help
text) and how a control shows it (a widget hint: ``slider``, ``dropdown``, ``text``, ``int``, ``checkbox``,
``item``, ``mask``...). A :class:`Schema` checks a dict of values and fails with a :class:`ParameterError`
naming the field, the value and the fix. ``SamplingConfig`` and ``FinetuneConfig`` validate through
:data:`SAMPLING` and :data:`FINETUNE`; the notebooks' checks, the edit panel's controls and the batch grid's
checks derive from these schemas. A field whose default is ``None`` with a ``profile`` setting takes the model
profile's value (:mod:`dedit_nb.profiles`).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping

# Short names of common diffusers schedulers; any other diffusers scheduler class name works as well.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
MAX_SEED = 2**64 - 1             # the largest seed torch.Generator takes
MAX_FINETUNE_SEED = 2**32 - 1    # each step's noise is seeded from (seed, stage, step), which must stay below 2**64
SEGMENTERS = ("offline", "sam", "panoptic", "grounded")    # dedit_nb.segment's methods (segment.METHODS)


class OneLineError(Exception):
    """An error a notebook shows as its message alone: IPython renders ``_render_traceback_`` instead of a
    traceback whose message is at the bottom of 15 lines of library frames. Code and papermill still get
    the exception (and papermill fails the run)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{type(self).__name__}: {self}\x1b[0m"]


class ParameterError(OneLineError, ValueError):
    """A parameter with a wrong name or value: says which (``name``), what it got and what it should be.
    ``where`` prefixes the name for settings objects (``SamplingConfig.steps: ...``)."""

    def __init__(self, name: str, message: str, where: str | None = None):
        super().__init__(f"{where}.{name}: {message}" if where else f"parameter {name!r}: {message}")
        self.name, self.message = name, message


# the Python types of each field type
KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,), "number": (int, float), "text": (str,), "bool": (bool,), "item": (int, str),
    "image": (int, str), "paths": (list,), "box": (list, tuple), "mask": (object,), "record": (dict,),
    "operations": (list,)}
WHAT = {"int": "an integer", "number": "a number", "text": "a string", "bool": "True or False",
        "item": "an item index or name", "image": "an image index (>= 0) or name",
        "paths": "a list of folders, e.g. ['runs/session_b']", "box": "a box [x0, y0, x1, y1] in pixels",
        "mask": "a boolean mask (H, W)", "record": "a record (dict)",
        "operations": "a list of operation dicts, e.g. [{'kind': 'move', 'item': 1, 'dx': 4}]"}


@dataclass(frozen=True)
class Field:
    """One parameter: ``type`` (a key of :data:`KINDS`), its default, an optional range (``low``/``high``,
    ``low_open``: low itself is refused) or ``choices``; ``optional``: None is accepted; ``profile``: the
    model-profile setting a None default stands for; ``other``: a test that accepts values outside
    ``choices`` (a scheduler class name), with ``other_what`` saying what they are; ``help`` and ``widget``
    for the controls that show it; ``required``: an operation must give it."""

    name: str
    type: str
    default: Any = None
    help: str = ""
    widget: str = "text"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple = ()
    optional: bool = False
    profile: str | None = None
    required: bool = False
    other: Callable[[Any], bool] | None = None
    other_what: str = ""

    @property
    def kinds(self) -> tuple[type, ...]:
        return KINDS[self.type]

    @property
    def what(self) -> str:
        """What the value should be, for error messages (e.g. "an integer >= 1")."""
        return self.describe()

    def describe(self, resolved: bool = False) -> str:
        """:attr:`what`; ``resolved``: once the profile's values are filled in (None no longer allowed)."""
        if self.choices and not self.other:
            return f"one of {self.choices}"
        what = WHAT[self.type]
        ranged = self.type not in ("item", "image")      # an item or image may be a name: WHAT says it all
        if ranged and self.low is not None and self.high is not None:
            what += f" between {self.low:g} and {self.high:g}" if self.type == "number" else \
                f" between {self.low} and {self.high}"
        elif ranged and self.low is not None:
            what += f" > {self.low}" if self.low_open else f" >= {self.low}"
        elif ranged and self.high is not None:
            what += f" <= {self.high}"
        if self.profile and not resolved:
            what += " or None (the model profile's value)"
        elif self.optional:
            what += " or None"
        return what

    def check(self, value, papermill: bool = False, where: str | None = None, resolved: bool = False) -> None:
        """Raise :class:`ParameterError` unless ``value`` is allowed. ``resolved``: the model profile's values
        are filled in, so None no longer stands for one; ``papermill``: the value came from papermill's
        command line (its -r/-p advice applies)."""
        if value is None and (self.optional or (self.profile and not resolved)):
            return
        fail = lambda message: ParameterError(self.name, message, where)  # noqa: E731
        what = self.describe(resolved)
        typed = isinstance(value, self.kinds) and not (isinstance(value, bool) and bool not in self.kinds)
        if typed and self.type == "paths":
            typed = all(isinstance(v, str) for v in value)
        if typed and self.type == "operations":      # each checked by its kind's schema (operations_from)
            typed = all(isinstance(v, Mapping) for v in value)
        if typed and self.type == "mask":
            typed = getattr(value, "ndim", None) == 2
        if typed and self.type == "box":
            typed = len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not typed:
            hint = ""
            if papermill and isinstance(value, str) and self.type in ("int", "number"):
                hint = (f" (a string: papermill's -r passes values as text; pass it with -p {self.name} {value}, "
                        "which reads numbers)")
            raise fail(f"should be {what}, got {value!r}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(f"should be {what}, got {value!r} (not a finite number)")
        if self.choices and value not in self.choices and not (self.other and self.other(value)):
            if self.other:
                raise fail(f"unknown {self.name} {value!r}: it is not one of {self.choices} nor {self.other_what}")
            raise fail(f"{value!r} is not one of {self.choices}")
        if self.type in ("int", "number", "item", "image") and isinstance(value, (int, float)):
            low_fails = self.low is not None and (value < self.low or (self.low_open and value == self.low))
            if low_fails or (self.high is not None and value > self.high):
                raise fail(f"should be {what}, got {value!r}")


@dataclass(frozen=True)
class Schema:
    """A named set of fields, in order; ``where`` prefixes error names for a settings object."""

    name: str
    fields: tuple[Field, ...]
    where: str | None = None

    def __post_init__(self):
        names = [f.name for f in self.fields]
        assert len(set(names)) == len(names), f"{self.name}: repeated field names {names}"

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __contains__(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def defaults(self) -> dict:
        """Each field's default (None where the model profile sets it)."""
        return {f.name: f.default for f in self.fields}

    def check(self, values: Mapping, papermill: bool = False, resolved: bool = False) -> dict:
        """Check named values: an unknown name fails naming the closest field; every value its field's type
        and range. Returns the values as a dict."""
        for name, value in values.items():
            if name not in self:
                raise ParameterError(name, f"unknown parameter{closest(name, self.names)}", self.where)
            self[name].check(value, papermill, self.where, resolved)
        return dict(values)

    def missing(self, values: Mapping) -> list[str]:
        """The required fields ``values`` leaves out."""
        return [f.name for f in self.fields if f.required and values.get(f.name) in (None, "")]

    def with_fields(self, name: str, *fields: Field, **changes: Field) -> "Schema":
        """Another schema: these fields with some replaced by name (``changes``), then ``fields`` added."""
        return Schema(name, tuple(changes.get(f.name, f) for f in self.fields) + fields)


def closest(name: str, names: list[str]) -> str:
    """'; did you mean X?' for the closest of ``names``, else the list of them."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; the parameters are {names}"


def _diffusers_scheduler(name) -> bool:
    from .sampler import scheduler_class
    try:
        scheduler_class(name)
    except ValueError:
        return False
    return True


# --- sampling ----------------------------------------------------------------------------------------------
SAMPLING = Schema("sampling", (
    Field("steps", "int", None, "scheduler steps", "slider", low=1, profile="steps"),
    Field("guidance", "number", None, "classifier-free guidance scale (<= 1 disables the unconditional pass)",
          "slider", low=0, profile="guidance"),
    Field("strength", "number", None, "share of steps during which the soft band is held to the original",
          "slider", low=0, high=1, profile="strength"),
    Field("edge_thickness", "int", None, "width in pixels of the soft band around the edit that is blended",
          "slider", low=0, profile="edge_thickness"),
    Field("seed", "int", 0, "image j of an edit uses seed + j", "int", low=0, high=MAX_SEED),
    Field("num_images", "int", 1, "samples per edit", "slider", low=1),
    Field("eta", "number", 0.0, "DDIM noise (0: deterministic DDIM; only schedulers that have eta)", "slider",
          low=0, high=1),
    Field("scheduler", "text", "ddim", "the diffusers scheduler that samples (ddim: deterministic; dpm++ / unipc: "
          "good in fewer steps; *-ancestral, ddpm: add noise)", "dropdown", choices=tuple(SCHEDULERS),
          other=_diffusers_scheduler, other_what="a diffusers scheduler class name such as 'PNDMScheduler'"),
    Field("profile", "record", None, "how the model profile chose the values (dedit_nb.profiles.Resolved)",
          "none", optional=True),
), where="SamplingConfig")

# --- finetune ----------------------------------------------------------------------------------------------
FINETUNE = Schema("finetune", (
    Field("num_tokens", "int", 5, "new tokens learned per item", "int", low=1),
    Field("stage1_steps", "int", None, "steps of stage 1 (item tokens)", "int", low=0, profile="stage1_steps"),
    Field("stage2_steps", "int", None, "steps of stage 2 (UNet or LoRA)", "int", low=0, profile="stage2_steps"),
    Field("stage1_lr", "number", None, "learning rate of stage 1", "text", low=0, low_open=True,
          profile="stage1_lr"),
    Field("stage2_lr", "number", None, "learning rate of stage 2", "text", low=0, low_open=True,
          profile="stage2_lr"),
    Field("lora", "bool", False, "stage 2 trains a LoRA on all attention layers instead of cross-attention q/k/v",
          "checkbox"),
    Field("lora_rank", "int", 4, "rank of the LoRA", "int", low=1),
    Field("lora_lr", "number", None, "learning rate of the LoRA", "text", low=0, low_open=True, profile="lora_lr"),
    Field("per_item", "bool", False, "stage 2 trains one LoRA per item (lora_rank, lora_lr), routed by the item "
          "map, so items can be exported to the bank", "checkbox"),
    Field("batch_size", "int", None, "images per step", "int", low=1, profile="batch_size"),
    Field("grad_accum", "int", 1, "steps whose gradients add up before an update", "int", low=1),
    Field("checkpoint_every", "int", 50, "steps between saved checkpoints", "int", low=1),
    Field("seed", "int", 0, "seeds each step's noise with (seed, stage, step)", "int", low=0,
          high=MAX_FINETUNE_SEED),
    Field("item_prompt_length", "int", 40, "tokens of an item prompt", "int", low=1),
    Field("gradient_checkpointing", "bool", False, "recompute activations in the backward pass: less memory, "
          "more time", "checkbox"),
    Field("offload_text_and_vae", "bool", False, "the VAE and text encoders wait on the CPU when unused",
          "checkbox"),
    Field("min_snr_gamma", "number", None, "Min-SNR-gamma loss weighting (0: off)", "text", low=0,
          profile="min_snr_gamma"),
    Field("init_tokens_from_name", "bool", None, "item tokens start from the mean embedding of the item name's "
          "words", "checkbox", profile="init_tokens_from_name"),
    Field("lr_warmup_steps", "int", None, "steps of linear learning-rate warm-up in each stage", "int", low=0,
          profile="lr_warmup_steps"),
    Field("lr_schedule", "text", None, "each stage's learning rate after the warm-up", "dropdown",
          choices=("constant", "cosine"), profile="lr_schedule"),
    Field("stop_when", "text", None, "a stage ends at its step limit, or once its validation loss stops falling",
          "dropdown", choices=("steps", "plateau"), profile="stop_when"),
    Field("validate_every", "int", None, "steps between validation losses (0: none)", "int", low=0,
          profile="validate_every"),
    Field("patience", "int", None, "validations without improvement before a plateau stop", "int", low=0,
          profile="patience"),
    Field("min_delta", "number", None, "the share of the best validation loss an improvement must reach", "text",
          low=0, profile="min_delta"),
    Field("profile", "record", None, "how the model profile chose the values", "none", optional=True),
), where="FinetuneConfig")

# --- segmentation ------------------------------------------------------------------------------------------
SEGMENTATION = Schema("segmentation", (
    Field("resolution", "int", None, "short side of the working size in pixels", "int", low=8, profile="resolution"),
    Field("multiple", "int", None, "working sides are multiples of this", "int", low=1, profile="multiple"),
    Field("segmenter", "text", "offline", "how the image is split into items", "dropdown", choices=SEGMENTERS),
    Field("num_items", "int", 6, "items the offline segmenter makes", "int", low=1),
    Field("checkpoint", "text", None, "a SAM .pth checkpoint (segmenters 'sam' and 'grounded')", "text", optional=True),
    Field("panoptic_model", "text", None, "a Mask2Former/OneFormer panoptic model id", "text", optional=True),
    Field("detector", "text", None, "a Grounding DINO model id (segmenter 'grounded')", "text", optional=True),
    Field("phrases", "text", "", "phrases to find (segmenter 'grounded'), e.g. 'bag. table.'", "text"),
))

# --- edit operations ---------------------------------------------------------------------------------------
ITEM = Field("item", "item", None, "the item edited (index or name)", "item", low=0, required=True)
MASK_HELP = "give one of mask (a boolean array), box [x0, y0, x1, y1] or mask_file (.png or .npy)"
MASK_FIELDS = (
    Field("mask", "mask", None, f"the item's new pixels: {MASK_HELP}", "mask", optional=True),
    Field("box", "box", None, "the item's new pixels as a box [x0, y0, x1, y1] (x1, y1 exclusive)", "box",
          optional=True),
    Field("mask_file", "text", None, "the item's new pixels as a .png (non-zero pixels) or .npy file", "text",
          optional=True),
)
SOURCE_ITEM_FILE = Field("source_item_file", "text", None, "a bank file (.safetensors), or the name of one of the "
                         "session's bank items, holding the item put in: no joint finetune needed", "text",
                         optional=True)
OPERATIONS: dict[str, Schema] = {
    "recon": Schema("recon", ()),
    "text": Schema("text", (
        ITEM, Field("prompt", "text", "", "the item's new prompt ('a red bag'), or a refinement with * standing for "
                    "the item ('a photo of * in gold')", "text", required=True))),
    "image": Schema("image", (
        ITEM, Field("source_image", "image", 0, "the image the source item is in", "dropdown", low=0),
        Field("source_item", "item", None, "the item put in the item's place", "item", low=0, optional=True),
        Field("template", "text", None, "optional text around the source item's tokens ('a photo of * in gold')",
              "text", optional=True),
        Field("source_session", "text", None, "the session folder of the source image, when it is another "
              "session finetuned jointly with this one", "text", optional=True),
        SOURCE_ITEM_FILE)),
    "move": Schema("move", (
        ITEM, Field("dx", "number", 0.0, "shift to the right, in pixels", "slider"),
        Field("dy", "number", 0.0, "shift down, in pixels", "slider"),
        Field("scale", "number", 1.0, "resize about the item's centre", "slider", low=0, low_open=True),
        replace(MASK_FIELDS[0], help="a redrawn mask for the item (overrides dx, dy and scale)"),
        replace(MASK_FIELDS[2], help="a redrawn mask for the item as a .png or .npy file"))),
    "remove": Schema("remove", (ITEM,)),
    "add": Schema("add", (
        Field("name", "text", "new item", "the new item's name", "text"),
        Field("prompt", "text", "", "the new item's text prompt ('a red hat'); with source_item_file, an optional "
              "template around the bank item's tokens", "text"),
        *MASK_FIELDS, SOURCE_ITEM_FILE)),
    "reshape": Schema("reshape", (ITEM, *MASK_FIELDS)),
}
EDIT_KINDS = tuple(OPERATIONS)
EDITS = Field("edits", "operations", None, "several operations sampled together in one pass (instead of the single "
              "edit's parameters), e.g. [{'kind': 'move', 'item': 1, 'dx': 4}, {'kind': 'remove', 'item': 2}]",
              "none", optional=True)
