"""The finetune's speed-ups change what they claim to: Min-SNR weighs each timestep's loss, the item tokens start
from their names' words, the learning rate warms up and decays, and a stage stops on its validation plateau (and
resumes, extends and reports as one that ran to its step limit)."""
import dataclasses
import warnings

import pytest
import torch

from dedit_nb.finetune import FinetuneConfig, FinetuneResult, finetune
from dedit_nb.finetune.schedules import lr_factor, min_snr_weight
from dedit_nb.models import load_model
from dedit_nb.session import Session
from dedit_nb.testing import build_tiny_model
from conftest import three_item_labels
from test_finetune import make_session

FAST = dict(num_tokens=2, batch_size=1, checkpoint_every=2, validate_every=0)


@pytest.fixture(scope="module")
def v_model_dir(tmp_path_factory):
    return build_tiny_model("sd2", tmp_path_factory.mktemp("tiny-sd2") / "sd2")


def test_min_snr_weights_follow_the_prediction_type():
    alphas = torch.tensor([0.999, 0.9, 0.5, 0.01])          # snr 999, 9, 1, 0.0101
    t = torch.arange(4)
    snr = alphas / (1 - alphas)
    gamma = 5.0
    eps = min_snr_weight(alphas, t, gamma, "epsilon")
    v = min_snr_weight(alphas, t, gamma, "v_prediction")
    x0 = min_snr_weight(alphas, t, gamma, "sample")
    assert torch.allclose(eps, torch.tensor([gamma / 999, gamma / 9, 1.0, 1.0]), rtol=1e-4)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1), rtol=1e-5)
    assert torch.allclose(x0, torch.minimum(snr, torch.tensor(gamma)), rtol=1e-5)
    assert torch.equal(min_snr_weight(alphas, t, 0.0, "epsilon"), torch.ones(4))


@pytest.mark.parametrize("kind", ["sd", "sd2"])
def test_min_snr_weighs_the_first_steps_loss_by_its_timestep(tmp_path, photo, tiny_model_dirs, v_model_dir, kind):
    """Same seed, same first noise and timestep: the weighted loss is the plain one times the weight of that
    timestep for the model's prediction type (epsilon for sd, v for sd2)."""
    folder = v_model_dir if kind == "sd2" else tiny_model_dirs["sd"]
    losses = {}
    for gamma in (0.0, 1e-4):   # below every SNR of the schedule: each weight is under 1
        model = load_model(str(folder))
        s = make_session(tmp_path, photo, model, name=f"g{gamma}")
        seen = []
        cfg = FinetuneConfig(stage1_steps=1, stage2_steps=0, min_snr_gamma=gamma, **FAST)
        finetune(model, s, cfg, callback=lambda run, stage, step, kw: seen.append(kw["loss"]) or kw,
                 progress=False)
        losses[gamma] = seen[0]
    from dedit_nb.finetune.loop import _Run
    captured = {}
    original = _Run.errors

    def spy(run, data, cond, noise, t):
        captured["t"] = t
        return original(run, data, cond, noise, t)

    model = load_model(str(folder))
    s = make_session(tmp_path, photo, model, name="spy")
    _Run.errors = spy
    try:
        finetune(model, s, FinetuneConfig(stage1_steps=1, stage2_steps=0, **FAST), progress=False)
    finally:
        _Run.errors = original
    scheduler = model.training_scheduler()
    weight = min_snr_weight(scheduler.alphas_cumprod, captured["t"], 1e-4, model.prediction_type)
    assert model.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert losses[1e-4] == pytest.approx(losses[0.0] * weight.item(), rel=1e-4)
    assert weight.item() != pytest.approx(1.0)


def test_item_tokens_start_from_the_mean_embedding_of_their_names_words(tmp_path, photo, tiny_model_dirs):
    """Every token of an item whose name tokenises starts as its words' mean embedding; an item with an unknown
    word (MiniLM's WordPiece gives [UNK]) keeps the random draw it gets without the option."""
    model = load_model(str(tiny_model_dirs["offline"]))
    rows = {}
    for init in (True, False):
        s = Session.create(tmp_path / str(init), photo, resolution=32, multiple=8)
        h, w = s.images[0].labels.shape
        s.set_items(0, three_item_labels(h, w), ["red circle", "background", "qzxv\u2603"])
        finetune(model, s, FinetuneConfig(stage1_steps=0, stage2_steps=0, init_tokens_from_name=init, **FAST),
                 progress=False)
        weights = s.load_weights("tokens")
        rows[init] = [[weights[f"0/{t}"] for t in item.tokens] for item in s.images[0].items]
        names = [item.name for item in s.images[0].items]
    slot = model.conditioner.slots[0]
    table = slot.embedding().weight
    for k in (0, 1):
        words = slot.tokenizer(names[k], add_special_tokens=False).input_ids
        assert len(words) >= 1 and slot.tokenizer.unk_token_id not in words
        for row, plain in zip(rows[True][k], rows[False][k]):
            assert torch.allclose(row, table[words].float().mean(0), atol=1e-6)
            assert not torch.allclose(plain, table[words].float().mean(0), atol=1e-3)
    assert slot.tokenizer.unk_token_id in slot.tokenizer(names[2], add_special_tokens=False).input_ids
    assert all(torch.equal(a, b) for a, b in zip(rows[True][2], rows[False][2]))


def test_lr_factor_warms_up_then_holds_or_decays():
    assert [lr_factor(k, 10, 4, "constant") for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(k, 10, 2, "cosine") for k in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0


@pytest.mark.parametrize("settings, factor", [(dict(lr_warmup_steps=4), 0.25), (dict(lr_warmup_steps=0), 1.0)])
def test_the_first_token_update_is_the_scheduled_share_of_the_rate(tmp_path, photo, tiny_model_dirs, settings,
                                                                     factor):
    """AdamW's first step moves every trained row entry by the rate itself (its update is lr * sign(grad)), so
    the largest change of a token row after one step is the scheduled learning rate."""
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    tokens = s.assign_tokens(FAST["num_tokens"])
    model.conditioner.add_tokens(tokens, generator=torch.Generator().manual_seed(0), restart=True)
    before = model.conditioner.get_token_rows(tokens)
    finetune(model, s, FinetuneConfig(stage1_steps=1, stage2_steps=0, stage1_lr=1e-2, **settings, **FAST),
             progress=False)
    after = s.load_weights("tokens")
    change = max((after[k] - before[k]).abs().max().item() for k in before)
    assert change == pytest.approx(1e-2 * factor, rel=1e-3)


PLATEAU = dict(stop_when="plateau", validate_every=1, patience=2, min_delta=0.99, num_tokens=2, batch_size=1,
               checkpoint_every=2)


def test_a_stage_stops_on_its_validation_plateau_and_the_session_says_why(tmp_path, photo, tiny_model_dirs):
    """min_delta 0.99 asks for a 99% fall: after the first validation (step 0) two misses end each stage at
    step 2 of 10; the session records it and the result plots it."""
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    result = finetune(model, s, FinetuneConfig(stage1_steps=10, stage2_steps=10, **PLATEAU), progress=False)
    stop = {"reason": "plateau", "step": 2, "limit": 10}
    assert result.completed and result.stopped == {"stage1": stop, "stage2": stop}
    assert [len(result.loss["stage1"]), len(result.loss["stage2"])] == [2, 2]
    assert [v[0] for v in result.validation["stage1"]] == [0, 1, 2]
    state = Session.open(s.folder).finetune_state
    assert state["done"] and state["stopped"] == result.stopped and state["stage"] == 2 and state["step"] == 2
    assert result.stop_reason("stage2") == "plateau at step 2 of 10"
    import matplotlib
    matplotlib.use("Agg")
    axes = result.plot()
    assert "plateau at step 2 of 10" in axes[0].get_title()
    validation_lines = [line for ax in axes[0].figure.axes for line in ax.get_lines()
                        if list(line.get_xdata()) == [0, 1, 2]]
    assert len(validation_lines) == 2          # one validation curve per stage, beside the training loss
    steps = finetune(model, make_session(tmp_path, photo, model, name="steps"),
                     FinetuneConfig(stage1_steps=3, stage2_steps=3, **{**PLATEAU, "stop_when": "steps"}),
                     progress=False)
    assert steps.stopped["stage2"] == {"reason": "step limit", "step": 3, "limit": 3}
    assert steps.stop_reason("stage1") == "the step limit (3)" and len(steps.loss["stage1"]) == 3


def test_the_validation_loss_uses_fixed_noise_and_timesteps(tmp_path, photo, tiny_model_dirs):
    """With a rate too small to move the weights, every validation loss of a stage is the same number while
    the training loss (new noise and timestep every step) is not."""
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    result = finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=0, stage1_lr=1e-12,
                                               **{**PLATEAU, "stop_when": "steps"}), progress=False)
    values = [v for _, v in result.validation["stage1"]]
    assert len(values) == 5 and max(values) - min(values) < 1e-6 * abs(values[0])
    assert max(result.loss["stage1"]) - min(result.loss["stage1"]) > 1e-3 * abs(values[0])


def test_an_interrupted_plateau_finetune_resumes_to_the_same_stop_and_weights(tmp_path, photo, tiny_model_dirs):
    folder = str(tiny_model_dirs["sd"])
    cfg = FinetuneConfig(stage1_steps=10, stage2_steps=10, stage1_lr=1e-2, stage2_lr=1e-2,
                         **{**PLATEAU, "min_delta": 0.5, "patience": 2})
    reference = make_session(tmp_path, photo, load_model(folder), name="ref", session_id="x")
    whole = finetune(load_model(folder), reference, cfg, progress=False)
    model = load_model(folder)
    s = make_session(tmp_path, photo, model, name="cut", session_id="x")
    finetune(model, s, cfg, callback=lambda run, stage, step, kw: (stage == "stage2" and run.stop()) or kw,
             progress=False)
    resumed = finetune(load_model(folder), Session.open(s.folder), cfg, progress=False)
    assert resumed.completed and resumed.stopped == whole.stopped
    assert resumed.validation == whole.validation
    a, b = Session.open(s.folder).load_weights("unet"), reference.load_weights("unet")
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_a_finished_plateau_finetune_is_done_until_its_step_limit_is_raised(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    cfg = FinetuneConfig(stage1_steps=10, stage2_steps=10, **PLATEAU)
    finetune(model, s, cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "extending a finished finetune": nothing is extended
        again = finetune(model, s, cfg, progress=False)
    assert again.completed and len(again.loss["stage2"]) == 2           # nothing more was trained
    with pytest.warns(UserWarning, match="extending a finished finetune"):
        longer = finetune(model, s, dataclasses.replace(cfg, stage2_steps=20), progress=False)
    # the extension starts its patience afresh: two more misses, then a plateau under the new limit
    assert longer.stopped["stage2"] == {"reason": "plateau", "step": 4, "limit": 20}
    with pytest.warns(UserWarning, match="extending a finished finetune"):
        full = finetune(model, s, dataclasses.replace(cfg, stage2_steps=20, stop_when="steps"), progress=False)
    assert len(full.loss["stage2"]) == 20 and full.stopped["stage2"]["reason"] == "step limit"


def test_resume_refuses_a_changed_speed_up_and_accepts_a_changed_stopping_rule():
    started = FinetuneConfig(min_snr_gamma=5.0, init_tokens_from_name=True, lr_warmup_steps=10)
    for change in (dict(min_snr_gamma=0.0), dict(init_tokens_from_name=False), dict(lr_warmup_steps=0),
                   dict(lr_schedule="cosine")):
        assert not dataclasses.replace(started, **change).resumable_with(started), change
    for change in (dict(stop_when="plateau", validate_every=5), dict(patience=9), dict(min_delta=0.5)):
        assert dataclasses.replace(started, **change).resumable_with(started), change


def test_bad_speed_up_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"FinetuneConfig.lr_schedule: 'linear' is not one of"):
        FinetuneConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="stop_when='plateau' needs validate_every >= 1"):
        FinetuneConfig(stop_when="plateau", validate_every=0)
    with pytest.raises(ValueError, match="FinetuneConfig.min_snr_gamma: should be a number >= 0"):
        FinetuneConfig(min_snr_gamma=-1)


def test_for_model_takes_the_profiles_speed_ups_and_keeps_explicit_values():
    from dedit_nb.profiles import PROFILES
    offline = PROFILES["offline"]
    cfg = FinetuneConfig.for_model("offline")
    for name in ("min_snr_gamma", "init_tokens_from_name", "lr_warmup_steps", "lr_schedule", "stop_when",
                 "validate_every", "patience", "min_delta", "stage1_steps", "stage2_steps"):
        assert getattr(cfg, name) == getattr(offline, name), name
    assert cfg.profile["profile"] == "offline"
    explicit = FinetuneConfig.for_model("offline", stop_when="steps", min_snr_gamma=1.5, profile={"mine": 1})
    assert explicit.stop_when == "steps" and explicit.min_snr_gamma == 1.5 and explicit.profile == {"mine": 1}


def test_a_result_without_validation_plots_the_training_loss_and_says_running():
    import matplotlib
    matplotlib.use("Agg")
    result = FinetuneResult(loss={"stage1": [1.0, 0.5], "stage2": []})
    axes = result.plot()
    assert len(axes[0].get_lines()) == 1 and result.stop_reason("stage2") == "not finished"
