"""Tiny randomly initialised models for tests and benchmarks, written as diffusers folders and loaded through
the same path as real checkpoints (:func:`~dedit_nb.models.load_model`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import MINILM_SOURCE, byte_level_clip_tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def build_tiny_model(family: str, folder: str | os.PathLike, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny randomly initialised model of a family ('sd', 'sd2', 'sdxl', 'offline') as a diffusers folder.

    Same classes and layout as the real checkpoints (``save_pretrained`` per component plus
    ``model_index.json``), small enough to run the whole engine on a CPU in seconds. 'sd2' is 'sd' with
    SD 2.x's differences: v-prediction and linear projections in the transformer blocks.
    """
    v_prediction = family == "sd2"
    family = "sd" if family == "sd2" else family
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    cross_dim = {"sd": 32, "sdxl": 64, "offline": 384}[family]
    unet_kwargs = dict(
        sample_size=sample_size, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4),
    )
    if family == "offline":
        unet_kwargs.update(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        unet_kwargs.update(in_channels=4, out_channels=4)
    if v_prediction:
        unet_kwargs.update(use_linear_projection=True)
    if family == "sdxl":
        unet_kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True,
                           transformer_layers_per_block=(1, 2))
    UNet2DConditionModel(**unet_kwargs).save_pretrained(folder / "unet")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1,
                  prediction_type="v_prediction" if v_prediction else "epsilon").save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if family == "offline":
        index.update({"_class_name": "DEditOfflinePipeline", "_dedit_family": "offline",
                      "_dedit_text_encoder": MINILM_SOURCE})
        _write_json(folder / "model_index.json", index)
        return folder
    AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, sample_size=sample_size * 2).save_pretrained(folder / "vae")
    # bos/eos/pad ids as in the real SD and SDXL text-encoder configs (eos 2 is their legacy value; the
    # tokenizer's end-of-text is another id), so tiny models take the same pooling path
    clip_kwargs = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, intermediate_size=37,
                       layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                       max_position_embeddings=77)
    if family == "sd":
        CLIPTextModel(CLIPTextConfig(hidden_size=32, **clip_kwargs)).save_pretrained(folder / "text_encoder")
        byte_level_clip_tokenizer().save_pretrained(folder / "tokenizer")
        index.update({"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "vae": ["diffusers", "AutoencoderKL"]})
    else:
        CLIPTextModel(CLIPTextConfig(hidden_size=32, **clip_kwargs)).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip_kwargs)
                                    ).save_pretrained(folder / "text_encoder_2")
        byte_level_clip_tokenizer().save_pretrained(folder / "tokenizer")
        byte_level_clip_tokenizer().save_pretrained(folder / "tokenizer_2")
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "vae": ["diffusers", "AutoencoderKL"]})
    _write_json(folder / "model_index.json", index)
    return folder
