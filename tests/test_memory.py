"""GPU memory known before training: the meta-device estimator against the CPU allocator, the auto-fit
order, and the memory fixes it found."""
import warnings

import numpy as np
import pytest
import torch

from dedit_nb import memory
from dedit_nb.finetune import flatten_optimizer_state
from dedit_nb.models import load_model, pick_dtype


def _meta_optimizer(memory_mode):
    w = torch.nn.Parameter(torch.empty(256, 256, device="meta"))
    opt = torch.optim.AdamW([w])
    w.grad = torch.empty_like(w)
    opt.step()
    return w, opt


def test_checkpoint_copies_adamw_moments_straight_to_the_cpu():
    with memory.DeviceMemory() as mem:
        w, opt = _meta_optimizer(mem)
        mem.reset_peaks()
        before = mem.allocated
        flat = flatten_optimizer_state(opt)
        assert mem.lower == before                         # not one byte more on the device, even for a moment
    assert {t.device.type for t in flat.values()} == {"cpu"}
    assert flat["0.exp_avg"].numel() == w.numel()


def test_pristine_qkv_copies_live_on_the_cpu(tiny_model_dirs):
    model = memory.meta_model(str(tiny_model_dirs["sd"]), "fp16")
    names = list(model.cross_attention_parameters())
    with memory.DeviceMemory() as mem:
        mem.adopt(model.unet.parameters())
        before = mem.allocated
        model.remember_pristine(names)
        assert mem.lower == before
        assert {v.device.type for v in model._pristine.values()} == {"cpu"}
        model.reset_unet()                                  # and they go back onto the model's device
    assert {p.device.type for n, p in model.unet.named_parameters() if n in names} == {"meta"}


@pytest.mark.parametrize("family,vae_dtype", [("sd", torch.float16), ("sdxl", torch.float32)])
def test_vae_upcast_only_for_sdxl(tiny_model_dirs, family, vae_dtype):
    model = load_model(str(tiny_model_dirs[family]), device="cpu", dtype="fp16")
    assert next(model.vae.parameters()).dtype == vae_dtype


def test_bf16_on_a_card_without_its_fused_attention_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.warns(UserWarning, match="use dtype='fp16'"):
        assert pick_dtype(torch.device("cuda"), "bf16") == torch.bfloat16   # the user's choice still wins
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pick_dtype(torch.device("cuda"), "bf16")
    assert memory.attention_kernel(torch.bfloat16, (7, 5)) == "math"
    assert memory.attention_kernel(torch.float16, (7, 5)) == "efficient"


def test_vae_tiling_tiles_at_exactly_the_vae_sample_size(tiny_model_dirs, monkeypatch):
    model = load_model(str(tiny_model_dirs["sd"]))
    model.enable_vae_tiling()
    size = model.vae.config.sample_size
    tiled = []
    original = type(model.vae).tiled_decode
    monkeypatch.setattr(type(model.vae), "tiled_decode",
                        lambda self, *a, **k: tiled.append(1) or original(self, *a, **k))
    model.decode_latents(torch.zeros(1, 4, size // model.vae_scale, size // model.vae_scale))
    assert tiled
