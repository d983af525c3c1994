"""The quality record: reference formulas on fixed arrays, the masked conventions on hand-built cases."""
import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dedit_nb import masks as M
from dedit_nb import quality as Q


def pair(h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    return a, b


def regions(active, soft=None):
    soft = np.zeros_like(active) if soft is None else soft
    return M.Regions(hard=~(active | soft), soft=soft, active=active)


def skimage_ssim(a, b):
    return structural_similarity(a / 255, b / 255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1)


def test_whole_image_scores_equal_scikit_image_and_numpy():
    a, b = pair()
    r = Q.quality_record(a, b, regions(np.zeros(a.shape[:2], bool)))
    mse = np.mean((a / 255 - b / 255) ** 2)
    for convention in ("preserved", "piebench"):     # everything preserved: both conventions are the plain scores
        assert r[f"mse_{convention}"] == pytest.approx(mse, abs=1e-9)
        assert r[f"psnr_{convention}"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-6)
        assert r[f"ssim_{convention}"] == pytest.approx(skimage_ssim(a, b), abs=1e-6)
    assert r["preserved_pixels"] == a.shape[0] * a.shape[1]
    assert r["preserved_pixels_changed"] == int((a != b).any(axis=-1).sum())


def test_piebench_convention_scores_the_masked_images_over_the_whole_image():
    a, b = pair(seed=1)
    active = np.zeros(a.shape[:2], bool)
    active[10:25, 12:30] = True
    soft = M.edit_regions(active, 3).soft
    keep = ~(active | soft)
    r = Q.quality_record(a, b, regions(active, soft))
    am, bm = a * keep[..., None], b * keep[..., None]
    assert r["mse_piebench"] == pytest.approx(np.mean((am / 255 - bm / 255) ** 2), abs=1e-9)
    assert r["psnr_piebench"] == pytest.approx(peak_signal_noise_ratio(am, bm, data_range=255), abs=1e-6)
    assert r["ssim_piebench"] == pytest.approx(skimage_ssim(am, bm), abs=1e-6)
    # over the preserved pixels only: the mean of their own squared errors
    assert r["mse_preserved"] == pytest.approx(np.mean((a[keep] / 255 - b[keep] / 255) ** 2), abs=1e-9)
    assert r["psnr_preserved"] == pytest.approx(10 * math.log10(1 / r["mse_preserved"]), abs=1e-9)


def test_preserved_scores_ignore_every_pixel_outside_the_preserved_region():
    a, b = pair(seed=2)
    active = np.zeros(a.shape[:2], bool)
    active[:, 20:34] = True
    b[~active] = a[~active]                        # preserved pixels identical, the rest anything
    r = Q.quality_record(a, b, regions(active))
    assert r["preserved_pixels_changed"] == 0 and r["mse_preserved"] == 0 and r["mse_piebench"] == 0
    assert r["psnr_preserved"] is None and r["psnr_piebench"] is None     # infinite PSNR is written as null
    assert r["ssim_preserved"] == 1.0 and r["ssim_piebench"] == 1.0
    # preserved pixels of constant colours x and y: every window sees only them, so SSIM is the luminance term
    x, y = np.full_like(a, 80), np.full_like(a, 120)
    x[active], y[active] = a[active], np.roll(a, 7, axis=0)[active]
    expected = (2 * (80 / 255) * (120 / 255) + Q.SSIM_C1) / ((80 / 255) ** 2 + (120 / 255) ** 2 + Q.SSIM_C1)
    assert Q.quality_record(x, y, regions(active))["ssim_preserved"] == pytest.approx(expected, abs=1e-9)
    # and pixels outside do not move the score
    y2 = y.copy()
    y2[active] = 255 - y2[active]
    assert Q.ssim(x, y2, ~active) == Q.ssim(x, y, ~active)


def test_ssim_over_the_preserved_pixels_only_equals_the_windowed_definition():
    """Reference: each pixel's 11 x 11 Gaussian window (edges mirrored), its statistics weighted by the window
    and the preserved mask, averaged over the preserved pixels away from the border."""
    a, b = pair(24, 26, seed=7)
    keep = np.ones(a.shape[:2], bool)
    keep[6:15, 9:20] = False
    r = Q.SSIM_RADIUS
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * Q.SSIM_SIGMA ** 2))
    window = np.outer(g, g)
    x, y, w = (np.pad(v, [(r, r), (r, r)] + [(0, 0)] * (v.ndim - 2), mode="symmetric")
               for v in (a / 255, b / 255, keep.astype(float)))
    scores = []
    for i in range(r, a.shape[0] - r):
        for j in range(r, a.shape[1] - r):
            if not keep[i, j]:
                continue
            weights = (window * w[i:i + 2 * r + 1, j:j + 2 * r + 1])[..., None]
            total = weights.sum()

            def mean(v):
                return (weights * v[i:i + 2 * r + 1, j:j + 2 * r + 1]).sum(axis=(0, 1)) / total
            mx, my = mean(x), mean(y)
            vx, vy, cxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
            scores.append(((2 * mx * my + Q.SSIM_C1) * (2 * cxy + Q.SSIM_C2))
                          / ((mx ** 2 + my ** 2 + Q.SSIM_C1) * (vx + vy + Q.SSIM_C2)))
    active = ~keep
    assert Q.quality_record(a, b, regions(active))["ssim_preserved"] == pytest.approx(np.mean(scores), abs=1e-6)


def test_seam_colour_shift_and_active_change_on_hand_built_edits():
    original = np.full((30, 30, 3), 100, np.uint8)
    active = np.zeros((30, 30), bool)
    active[10:20, 10:20] = True
    soft = M.edit_regions(active, 2).soft
    edited = original.copy()
    edited[active | soft] = 110                     # regenerated pixels 10 levels brighter: a step at the border
    r = Q.quality_record(original, edited, regions(active, soft))
    assert r["seam_score"] == pytest.approx((10 + 1) / (0 + 1))
    assert r["soft_colour_shift_rgb"] == pytest.approx([10, 10, 10])
    assert r["soft_colour_shift"] == pytest.approx(10 * math.sqrt(3))
    assert r["active_changed_share"] == 1.0 and r["active_mean_abs_diff"] == pytest.approx(10)
    edited = original.copy()
    edited[soft] = original[soft] + np.array([3, 0, -2])      # a signed drift: red up, blue down
    edited[10:15, 10:20, 1] += 6                    # half the active pixels, one channel
    r = Q.quality_record(original, edited, regions(active, soft))
    assert r["soft_colour_shift_rgb"] == pytest.approx([3, 0, -2]) and r["soft_colour_shift"] == pytest.approx(13 ** .5)
    assert r["active_changed_share"] == 0.5 and r["active_mean_abs_diff"] == pytest.approx(6 * 0.5 / 3)
    assert Q.seam_score(original, ~(active | soft)) == 1.0        # no step anywhere: no seam


def test_a_recon_has_nothing_preserved_and_says_so():
    a, b = pair()
    r = Q.quality_record(a, b, regions(np.ones(a.shape[:2], bool)))
    assert r["preserved_pixels"] == 0 and r["preserved_pixels_changed"] == 0
    assert all(r[k] is None for k in ("mse_preserved", "psnr_preserved", "ssim_preserved", "mse_piebench",
                                      "psnr_piebench", "ssim_piebench", "seam_score", "soft_colour_shift"))
    assert r["active_changed_share"] == pytest.approx((a != b).any(axis=-1).mean())


def test_bad_input_is_refused_and_weight_scores_need_local_weights(tmp_path):
    a, b = pair()
    with pytest.raises(ValueError, match="same"):
        Q.quality_record(a, b[:-1], regions(np.zeros(a.shape[:2], bool)))
    with pytest.raises(ValueError, match="resolution"):
        Q.quality_record(a, b, regions(np.zeros((4, 4), bool)))
    assert "unavailable" in Q.quality_record(a, b, regions(np.zeros(a.shape[:2], bool)))["weight_scores"]
    with pytest.raises(ValueError, match="'clip'"):
        Q.WeightedScorer({"lpipz": tmp_path})
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Q.WeightedScorer({"clip": tmp_path / "missing"})


def test_clip_text_image_score_from_a_local_random_model(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    from dedit_nb.models import byte_level_clip_tokenizer
    tokenizer = byte_level_clip_tokenizer()
    torch.manual_seed(3)        # a random model whose cosine for this pair is positive, so CLIPScore is not 0
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2), projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    a, b = pair(32, 32)         # at the model's input size: the two paths differ only in resampling otherwise
    active = np.zeros(a.shape[:2], bool)
    active[10:20, 10:20] = True
    scorer = Q.WeightedScorer({"clip": tmp_path / "clip"})
    record = Q.quality_record(a, b, regions(active), "a red bag", scorer)
    # reference: transformers' own CLIP image processor at the model's size, and CLIPScore's 100 * max(cos, 0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        out = model(**tokenizer(["a red bag"], return_tensors="pt"), **processor(images=b, return_tensors="pt"))
    expected = 100 * max((out.logits_per_image / model.logit_scale.exp()).item(), 0.0)
    assert expected > 0 and record["weight_scores"]["clip_text_image"] == pytest.approx(expected, abs=1e-4)
    assert Q.quality_record(a, b, regions(active), None, scorer)["weight_scores"] == {"clip_text_image": None}


def lpips_folder(folder, net="alex", seed=0):
    """A randomly initialised LPIPS in the documented local format (linear weights >= 0, as trained ones are)."""
    import json

    import torch
    from safetensors.torch import save_file
    from dedit_nb.perceptual import LPIPS
    torch.manual_seed(seed)
    model = LPIPS(net)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"net": net}))
    save_file(model.features.state_dict(), folder / "backbone.safetensors")
    save_file({k: v.abs() for k, v in model.state_dict().items() if k.startswith("lin")}, folder / "linear.safetensors")
    return folder


def test_lpips_from_local_random_weights_is_a_distance_of_the_masked_images(tmp_path):
    a, b = pair(64, 64, seed=4)
    active = np.zeros(a.shape[:2], bool)
    active[16:40, 20:44] = True
    scorer = Q.WeightedScorer({"lpips": lpips_folder(tmp_path / "lpips")})
    kept = a.copy()
    kept[active] = b[active]                     # only the active pixels changed: the masked images are equal
    assert Q.quality_record(a, kept, regions(active), scorer=scorer)["weight_scores"] == {"lpips_piebench": 0.0}
    changed = Q.quality_record(a, b, regions(active), scorer=scorer)["weight_scores"]["lpips_piebench"]
    assert changed > 0
    assert Q.quality_record(b, a, regions(active), scorer=scorer)["weight_scores"]["lpips_piebench"] == \
        pytest.approx(changed, rel=1e-6)
    assert scorer.lpips(a, a) == 0 and scorer.lpips(a, b) > 0
    assert Q.quality_record(a, b, regions(np.ones(a.shape[:2], bool)), scorer=scorer)["weight_scores"] == \
        {"lpips_piebench": None}                 # nothing preserved: no background score, as PIE-Bench
    (tmp_path / "lpips" / "linear.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no linear.safetensors"):
        Q.WeightedScorer({"lpips": tmp_path / "lpips"})
    lpips_folder(tmp_path / "vgg", net="vgg16")
    (tmp_path / "vgg" / "config.json").write_text('{"net": "alex"}')     # vgg16 weights under an alex config
    with pytest.raises(RuntimeError):
        Q.WeightedScorer({"lpips": tmp_path / "vgg"})


def vit_folder(folder, kind="vit"):
    import torch
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel
    torch.manual_seed(5)
    shape = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2)
    model = ViTModel(ViTConfig(**shape), add_pooling_layer=False) if kind == "vit" else Dinov2Model(Dinov2Config(**shape))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_dino_structure_distance_from_a_local_random_vit(tmp_path, kind):
    model = vit_folder(tmp_path / kind, kind)
    a, b = pair(32, 32, seed=6)
    active = np.zeros(a.shape[:2], bool)
    active[8:20, 8:20] = True
    scorer = Q.WeightedScorer({"dino": tmp_path / kind})
    scores = Q.quality_record(a, a.copy(), regions(active), scorer=scorer)["weight_scores"]
    assert scores == {"dino_structure_distance": 0.0}
    assert Q.quality_record(a, b, regions(active), scorer=scorer)["weight_scores"]["dino_structure_distance"] > 0
    if kind == "vit":       # reference: the last layer's keys from its input hidden state, cosine over all tokens
        import torch
        from PIL import Image
        from dedit_nb.perceptual import IMAGENET_MEAN, IMAGENET_STD

        def similarity(image):
            x = (np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC), np.float32) / 255
                 - IMAGENET_MEAN) / IMAGENET_STD
            with torch.no_grad():
                states = model(pixel_values=torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None],
                               output_hidden_states=True).hidden_states
                last = model.layers[-1]
                keys = torch.nn.functional.normalize(last.attention.k_proj(last.layernorm_before(states[-2]))[0], dim=-1)
            return keys @ keys.T
        expected = float((similarity(a) - similarity(b)).square().mean())
        assert scorer.dino(a, b) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="'dino'"):
        Q.WeightedScorer({"dinov3": tmp_path / kind})
