"""Behaviours an independent mutant list (tools/mutants-independent.yaml) found unguarded: the v-prediction
training target, a resume with another seed, SDXL's size conditioning on non-square images, the item range."""
import pytest
import torch

from dedit_nb.edits import Editor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.images import rgb_to_tensor
from dedit_nb.models import load_model
from dedit_nb.testing import build_tiny_model
from dedit_nb.session import Session, SessionError
from conftest import finetune_stopping_at, three_item_labels

FAST = dict(num_tokens=2, checkpoint_every=1)


def make_session(folder, photo, model):
    s = Session.create(folder, photo, resolution=32, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    return s


def test_v_prediction_models_are_trained_towards_the_velocity(tmp_path, photo):
    """With a denoiser that predicts zeros the loss is the target's mean square: for a v-prediction model
    that is v = sqrt(ab) * eps - sqrt(1 - ab) * x0 of the noise actually drawn, not eps."""
    model = load_model(str(build_tiny_model("sd2", tmp_path / "sd2")))
    assert model.prediction_type == "v_prediction"
    s = make_session(tmp_path / "s", photo, model)
    real, seen = model.predict, []

    def zero_predict(noisy, t, *args, **kwargs):
        seen.append((noisy.detach().float(), t))
        return real(noisy, t, *args, **kwargs) * 0      # zeros that keep the graph the backward pass needs

    model.predict = zero_predict
    result = finetune(model, s, FinetuneConfig(stage1_steps=2, stage2_steps=0, batch_size=2, **FAST), progress=False)
    x0 = model.encode_images(rgb_to_tensor(s.images[0].working)).float()
    ab = model.training_scheduler().alphas_cumprod
    assert len(seen) == len(result.loss["stage1"]) == 2
    for (noisy, t), loss in zip(seen, result.loss["stage1"]):
        a = ab[t].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        assert loss == pytest.approx(v.square().mean().item(), rel=1e-4)
        assert loss != pytest.approx(eps.square().mean().item(), rel=1e-2)     # the test tells them apart


def test_resuming_a_finetune_with_another_seed_is_refused_and_keeps_the_checkpoint(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path / "s", photo, model)
    cfg = FinetuneConfig(stage1_steps=3, stage2_steps=1, seed=5, **FAST)
    finetune(model, s, cfg, progress=False, callback=finetune_stopping_at("stage1", 1))
    before = s.finetune_state
    assert (before["stage"], before["step"]) == (1, 2)
    tokens = s.load_weights("tokens")
    with pytest.raises(SessionError, match=r"seed=5.*resume=False"):
        finetune(model, s, FinetuneConfig(stage1_steps=3, stage2_steps=1, seed=6, **FAST), progress=False)
    reopened = Session.open(tmp_path / "s")
    assert reopened.finetune_state == before
    assert all(torch.equal(v, tokens[k]) for k, v in reopened.load_weights("tokens").items())


def test_sdxl_size_conditioning_is_the_image_height_then_width_in_pixels(tmp_path, photo, tiny_model_dirs):
    """SDXL's time ids are (original h, w, crop top, left, target h, w): on a non-square image, in training
    and in edits alike."""
    model = load_model(str(tiny_model_dirs["sdxl"]))
    s = make_session(tmp_path / "s", photo, model)
    width, height = s.images[0].size
    assert width != height
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"])

    hook = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        finetune(model, s, FinetuneConfig(stage1_steps=1, stage2_steps=1, **FAST), progress=False)
        trained = len(seen)
        Editor(model, s, progress=False).text(0, "left", "a red bag", steps=2, guidance=2.0)
    finally:
        hook.remove()
    assert 0 < trained < len(seen)
    expected = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    for time_ids in seen:
        assert torch.equal(time_ids.float(), expected.expand_as(time_ids))


def test_an_item_index_one_past_the_last_is_refused_naming_the_range(tmp_path, photo):
    s = Session.create(tmp_path / "s", photo, resolution=32, multiple=8)
    entry = s.images[0]
    h, w = entry.labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    assert [entry.item_index(k) for k in range(3)] == [0, 1, 2]
    for bad in (3, -1):
        with pytest.raises(SessionError, match=rf"items 0\.\.2; got {bad}"):
            entry.item_index(bad)
    with pytest.raises(SessionError, match=r"items 0\.\.2; got 3"):
        s.rename_item(0, 3, "bag")
    assert [it.label for it in Session.open(tmp_path / "s").images[0].items] == ["left", "right", "top"]
