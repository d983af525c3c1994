"""The models estimated: published configs of SD 1.5, SD 2.1 and SDXL, and models built from configs on the meta
device."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models import DEditModel


_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "norm_num_groups": 32, "in_channels": 3, "out_channels": 3, "act_fn": "silu"}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}
_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}

# The published configs (diffusers / transformers config.json) of the three families, as far as they set sizes.
FAMILIES = {
    "sd15": {
        "family": "sd",
        "unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
                 "attention_head_dim": 8, "sample_size": 64, "in_channels": 4, "out_channels": 4,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text": [(_CLIP_L, -1, False)],
        "scheduler": _SCHEDULER,
    },
    "sd21": {
        "family": "sd",
        "unet": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1024,
                 "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "upcast_attention": True,
                 "sample_size": 96, "in_channels": 4, "out_channels": 4,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {**_SD_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        "text": [({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                   "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512, "vocab_size": 49408,
                   "max_position_embeddings": 77}, -1, False)],
        "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "family": "sdxl",
        "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
                 "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                 "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "in_channels": 4,
                 "out_channels": 4, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                 "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]},
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text": [(_CLIP_L, -2, False),
                 ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408,
                   "max_position_embeddings": 77}, -2, True)],
        "scheduler": _SCHEDULER,
        "zero_uncond": True,
    },
}


def _folder_spec(folder: str) -> dict:
    """A local diffusers folder's configs in the form of :data:`FAMILIES` (its tokenizers are not read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig
    from ..models import _model_index, _scheduler_config, model_family
    index = _model_index(folder)
    family = model_family(index)
    if family == "offline":
        raise ValueError("the offline model is a pixel-space demo model with its own encoder: estimate SD models "
                         "(sd15, sd21, sdxl or their folders)")
    text = [(AutoConfig.from_pretrained(folder, subfolder="text_encoder").to_dict(), -2 if family == "sdxl" else -1,
             False)]
    if family == "sdxl":
        text.append((AutoConfig.from_pretrained(folder, subfolder="text_encoder_2").to_dict(), -2, True))
    return {"family": family, "unet": dict(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            "vae": dict(AutoencoderKL.load_config(folder, subfolder="vae")), "text": text,
            "scheduler": _scheduler_config(folder, index),
            "zero_uncond": bool(index.get("force_zeros_for_empty_prompt", False))}


def model_from_configs(model: str, dtype: str | torch.dtype = "fp16", device: str = "meta") -> DEditModel:
    """A :class:`~dedit_nb.models.DEditModel` of a family (``sd15``, ``sd21``, ``sdxl``) or a local diffusers
    folder, built from its configs on ``device`` (meta: no memory; elsewhere random weights) in ``dtype``
    (the VAE's dtype chosen as :func:`load_model` does). Its tokenizers are byte-level stand-ins: prompts
    are padded to fixed lengths, so shapes are the real ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from ..models import DEditModel, EncoderSlot, TextConditioner, byte_level_clip_tokenizer, pick_dtype, vae_dtype
    spec = FAMILIES[model] if model in FAMILIES else _folder_spec(model)
    from diffusers.utils import logging as diffusers_logging
    dt = pick_dtype(torch.device("cuda"), dtype)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()   # its advice on casting with to() is for loaded weights
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec["unet"]).to(dt)
        vae = AutoencoderKL.from_config(spec["vae"])
        vae.to(vae_dtype(spec["family"], dict(vae.config), dt))
        slots = []
        for config, hidden_layer, pooled in spec["text"]:
            cls = CLIPTextModelWithProjection if pooled else CLIPTextModel
            config = CLIPTextConfig(**{k: v for k, v in config.items() if k in CLIPTextConfig().to_dict()})
            slots.append(EncoderSlot(byte_level_clip_tokenizer(), cls(config).to(dt), hidden_layer=hidden_layer,
                                     gives_pooled=pooled))
    diffusers_logging.set_verbosity(verbosity)
    text = TextConditioner(slots, added_time_ids=spec["family"] == "sdxl")
    return DEditModel(str(model), spec["family"], unet, spec["scheduler"], text, vae=vae,
                      device=torch.device(device), dtype=dt, zero_uncond=spec.get("zero_uncond", False))


def meta_like(model: DEditModel) -> DEditModel:
    """A loaded :class:`~dedit_nb.models.DEditModel`'s architecture on the meta device, in its dtypes (the
    tokenizers are copies: estimating adds item tokens to them)."""
    import copy
    import dataclasses
    from diffusers.utils import logging as diffusers_logging
    from ..models import DEditModel, TextConditioner
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    with torch.device("meta"):
        unet = type(model.unet).from_config(model.unet.config).to(model.dtype)
        vae = None if model.vae is None else type(model.vae).from_config(model.vae.config).to(model._vae_dtype())
        slots = [dataclasses.replace(s, tokenizer=copy.deepcopy(s.tokenizer),
                                     encoder=type(s.encoder)._from_config(s.encoder.config).to(model.dtype))
                 for s in model.conditioner.slots]
    diffusers_logging.set_verbosity(verbosity)
    return DEditModel(model.model_id, model.family, unet, model.scheduler_config,
                      TextConditioner(slots, added_time_ids=model.conditioner.added_time_ids), vae=vae,
                      device=torch.device("meta"), dtype=model.dtype, zero_uncond=model.zero_uncond)
