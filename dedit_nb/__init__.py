"""dedit_nb: D-Edit item-level image editing, as a helper package for notebooks.

The steps, each a module: ``session`` (the folder that carries a project), ``models`` (load any SD / SDXL /
offline model), ``segment`` (split an image into items), ``finetune`` (learn item prompts), ``edits``
(reconstruct, text, image, move, remove), with ``masks`` (partition math) and ``attention`` (grouped
cross-attention) underneath. No UI code lives here.
"""
from .edits import EDIT_KINDS, Editor, EditResult, run_edit
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .masks import ItemMove, PartitionError
from .models import DEditModel, ModelLoadError, load_model
from .sampler import SamplingConfig
from .session import Session, SessionError

__all__ = ["EDIT_KINDS", "Editor", "EditResult", "run_edit", "FinetuneConfig", "FinetuneResult", "finetune",
           "ItemMove", "PartitionError", "DEditModel", "ModelLoadError", "load_model",
           "SamplingConfig", "Session", "SessionError"]
