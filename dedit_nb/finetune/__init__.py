"""Two-stage D-Edit finetuning of a session's items.

Stage 1 learns each item's new token embeddings (only those rows are trained: no other row of the embedding
tables changes). Stage 2 trains the UNet's cross-attention q/k/v projections, or a LoRA on all attention layers
(peft), with the tokens frozen. All images of a session, and of any ``extra_sessions``, train jointly
(their losses add up in every step), so items can later move between them. Only trained tensors are saved
(safetensors), with the optimizer state and the loss history, every ``checkpoint_every`` steps: an
interrupted finetune resumes where it stopped and, because each step's noise comes from
``(seed, stage, step)``, ends with the same weights as an uninterrupted one.

Precision: the model runs in the dtype it was loaded in (fp32, fp16 or bf16); what is trained is held in
fp32 master copies (the token rows; the q/k/v weights, whose model-dtype copies follow them; the LoRA
weights themselves), with loss scaling in fp16. The saved UNet delta is in the model's dtype; the fp32
masters travel with the optimizer state until the finetune is done, so a resumed run still ends with the
weights of an uninterrupted one.
"""
from __future__ import annotations

from .config import (LORA_TARGETS, MAX_FINETUNE_SEED, Callback, FinetuneConfig, FinetuneResult,
                     NonFiniteError)
from .loop import _Run   # noqa: F401  (tests patch _Run.loss)
from .stages import finetune
from .state import FP32Masters, flatten_optimizer_state, restore_optimizer_state

__all__ = ["Callback", "FP32Masters", "FinetuneConfig", "FinetuneResult", "LORA_TARGETS", "MAX_FINETUNE_SEED",
           "NonFiniteError", "finetune", "flatten_optimizer_state", "restore_optimizer_state"]
