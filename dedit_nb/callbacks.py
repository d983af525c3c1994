"""The one callback contract of sampling and finetuning: diffusers' ``callback_on_step_end``.

A callback is called after every step as ``callback(owner, position, step_or_timestep, callback_kwargs)``
and returns a dict (``callback_kwargs`` itself to change nothing): the sampler passes its
:class:`~dedit_nb.sampler.SamplingRun`, the step and the timestep, as a diffusers pipeline passes itself;
the finetune passes its :class:`~dedit_nb.finetune.FinetuneRun`, the stage and the step. A callback of
another form is refused by name before the first step, and one that returns something else after it.
"""
from __future__ import annotations

import inspect


def check_callback(callback, call: str, hint: str, *arguments) -> None:
    """Refuse a ``callback`` that cannot be called with ``arguments`` (examples of the real ones), saying
    how it is called (``call``), and ``hint``."""
    try:
        inspect.signature(callback).bind(*arguments)
    except TypeError:
        raise TypeError(f"the callback is called as {call} and returns a dict (callback_kwargs to change "
                        f"nothing), as diffusers' callback_on_step_end; {callback!r} does not take these "
                        f"{len(arguments)} arguments. {hint}") from None
    except ValueError:  # no signature to read (a builtin): it is called and fails on its own if it must
        pass


def callback_outputs(callback, outputs, hint: str = "") -> dict:
    """What a callback returned, which must be a dict (as diffusers pipelines pop keys from it)."""
    if not isinstance(outputs, dict):
        raise TypeError(f"a step callback returns a dict, as diffusers' callback_on_step_end (return "
                        f"callback_kwargs to change nothing); {callback!r} returned {type(outputs).__name__}. "
                        f"{hint}".strip())
    return outputs
