"""Two-stage finetune: exactly the intended parameters change; interrupted runs resume to the same weights."""
import dataclasses

import numpy as np
import pytest
import torch

from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model, session_adapter
from dedit_nb.session import Session, SessionError
from conftest import finetune_stopping_at, three_item_labels

FAST = dict(num_tokens=2, batch_size=1, checkpoint_every=2)


def make_session(tmp_path, photo, model, name="s", session_id=None):
    s = Session.create(tmp_path / name, photo, resolution=32, multiple=model.latent_factor * 2, session_id=session_id)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    return s


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_stage1_changes_only_the_new_embedding_rows(tmp_path, photo, tiny_model):
    model = tiny_model
    s = make_session(tmp_path, photo, model)
    tokens = s.assign_tokens(FAST["num_tokens"])
    model.conditioner.add_tokens(tokens)
    unet_before = snapshot(model.unet)
    encoders_before = [snapshot(slot.encoder) for slot in model.conditioner.slots]
    finetune(model, s, FinetuneConfig(stage1_steps=3, stage2_steps=0, stage1_lr=1e-2, **FAST), progress=False)
    assert len(tokens) == 3 * 2 and s.all_tokens() == tokens
    for slot, before, ids in zip(model.conditioner.slots, encoders_before, model.conditioner.token_ids(tokens)):
        table = slot.embedding().weight
        name = next(n for n, p in slot.encoder.named_parameters() if p is table)
        new = torch.zeros(table.shape[0], dtype=torch.bool)
        new[ids] = True
        assert torch.equal(table[~new], before[name][~new])                   # every other row: bit for bit
        assert not torch.allclose(table[new], before[name][new])              # the item tokens learned
        for n, p in slot.encoder.named_parameters():
            if n != name:
                assert torch.equal(p, before[n])
    for n, p in model.unet.named_parameters():
        assert torch.equal(p, unet_before[n])


def test_stage1_new_rows_move_from_their_initialisation(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    tokens = s.assign_tokens(2)
    model.conditioner.add_tokens(tokens, generator=torch.Generator().manual_seed(0))
    init = model.conditioner.get_token_rows(tokens)
    finetune(model, s, FinetuneConfig(stage1_steps=3, stage2_steps=0, stage1_lr=1e-2, **FAST), progress=False)
    learned = s.load_weights("tokens")
    assert set(learned) == set(init)
    assert all(not torch.allclose(learned[k], init[k]) for k in init)


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_changes_only_the_chosen_parameters_and_saves_only_them(tmp_path, photo, tiny_model, lora):
    model = tiny_model
    s = make_session(tmp_path, photo, model)
    before = snapshot(model.unet)
    cfg = FinetuneConfig(stage1_steps=1, stage2_steps=3, stage2_lr=1e-2, lora_lr=1e-2, lora=lora, **FAST)
    finetune(model, s, cfg, progress=False)
    saved = s.load_weights("unet")
    after = snapshot(model.unet)
    if lora:
        assert saved and all("lora_" in n for n in saved)
        base = {n.replace(".base_layer", ""): p for n, p in after.items() if "lora_" not in n}
        assert set(base) == set(before)
        assert all(torch.equal(base[n], before[n]) for n in before)        # base weights untouched
        assert any(not torch.equal(after[n], 0 * after[n]) for n in saved if "lora_B" in n)
    else:
        assert saved and all(".attn2.to_" in n for n in saved)
        assert set(saved) == set(model.delta.cross_attention_parameters())
        changed = {n for n in before if not torch.equal(after[n], before[n])}
        assert changed and changed <= set(saved)
    total = sum(p.numel() for p in model.unet.parameters())
    assert sum(v.numel() for v in saved.values()) < total / 2               # never the whole UNet


@pytest.mark.parametrize("dtype,lora", [("bf16", False), ("fp32", True),
                                        pytest.param("fp32", False, marks=pytest.mark.slow),
                                        pytest.param("fp16", True, marks=pytest.mark.slow)])
def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, photo, tiny_model_dirs, dtype, lora):
    """Also in half precision, where the saved delta is in the model's dtype and the fp32 masters and loss
    scale travel with the optimizer state."""
    cfg = FinetuneConfig(stage1_steps=4, stage2_steps=4, stage1_lr=1e-2, stage2_lr=1e-2, lora=lora, **FAST)
    model_a = load_model(str(tiny_model_dirs["sd"]), dtype=dtype)
    straight = make_session(tmp_path, photo, model_a, "straight")
    full = finetune(model_a, straight, cfg, progress=False)

    model_b = load_model(str(tiny_model_dirs["sd"]), dtype=dtype)
    interrupted = make_session(tmp_path, photo, model_b, "interrupted", session_id=straight.id)  # same token names
    for stop_at in [("stage1", 2), ("stage2", 0)]:
        part = finetune(model_b, interrupted, cfg, progress=False,
                        callback=finetune_stopping_at(*stop_at))
        assert not part.completed
    model_c = load_model(str(tiny_model_dirs["sd"]), dtype=dtype)   # a fresh process, as after a crash
    resumed = finetune(model_c, Session.open(tmp_path / "interrupted"), cfg, progress=False)
    assert resumed.completed
    assert all(np.allclose(resumed.loss[stage], full.loss[stage]) for stage in ("stage1", "stage2"))
    for kind in ("unet", "tokens"):
        a, b = straight.load_weights(kind), Session.open(tmp_path / "interrupted").load_weights(kind)
        assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert not straight.load_weights("optimizer")          # resume state is dropped once the finetune is done
    if dtype != "fp32" and not lora:
        assert all(v.dtype == model_a.dtype for v in straight.load_weights("unet").values())


def test_stage1_optimizer_state_holds_only_the_trained_rows(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sdxl"]))
    s = make_session(tmp_path, photo, model)
    finetune(model, s, FinetuneConfig(stage1_steps=3, stage2_steps=1, **FAST), progress=False,
             callback=finetune_stopping_at("stage1", 1))
    moments = {k: v for k, v in s.load_weights("optimizer").items() if not k.endswith(".step")}
    width = sum(slot.embedding().weight.shape[1] for slot in model.conditioner.slots)
    assert sum(v.numel() for v in moments.values()) == 2 * len(s.all_tokens()) * width   # Adam's two moments


def test_resume_with_other_settings_is_refused(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=0, **FAST), progress=False,
             callback=finetune_stopping_at("stage1", 0))
    with pytest.raises(SessionError, match="other settings"):
        finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=0, **{**FAST, "num_tokens": 3}), progress=False)
    with pytest.raises(SessionError, match="done 1 steps of stage 1, more than the 0 asked for"):
        finetune(model, s, FinetuneConfig(stage1_steps=0, stage2_steps=0, **FAST), progress=False)
    finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=2, **FAST), progress=False,
             callback=finetune_stopping_at("stage2", 0))             # stop after stage 2's first step
    assert (s.finetune_state["stage"], s.finetune_state["step"]) == (2, 1)
    with pytest.raises(SessionError, match="stage 1 of this session's finetune is over"):
        finetune(model, s, FinetuneConfig(stage1_steps=6, stage2_steps=2, **FAST), progress=False)
    finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=2, **FAST), progress=False)
    with pytest.warns(UserWarning, match="AdamW starts afresh"):
        result = finetune(model, s, FinetuneConfig(stage1_steps=4, stage2_steps=3, **FAST), progress=False)
    assert result.completed and len(result.loss["stage2"]) == 3


def test_joint_finetune_of_several_images(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    for flip in (photo[:, ::-1], photo[::-1]):
        i = s.add_image(flip)
        h, w = s.images[i].labels.shape
        s.set_items(i, three_item_labels(h, w)[::-1].copy(), ["a", "b", "c"])
    finetune(model, s, FinetuneConfig(stage1_steps=2, stage2_steps=1, **FAST), progress=False)
    tokens = s.load_weights("tokens")
    assert len({k.split("/", 1)[1] for k in tokens}) == 3 * 3 * 2     # 3 images x 3 items x 2 tokens


def test_one_model_serves_many_sessions_as_fresh_models_would(tmp_path, photo, tiny_model_dirs):
    """B (LoRA) and A (attention mode) share one loaded model: every finetune, resume and edit runs with its
    own session's tokens and UNet delta only, as on a freshly loaded model, and a reset gives back the
    loaded UNet bit for bit under its own parameter names."""
    from dedit_nb.edits import Editor
    folder = str(tiny_model_dirs["sd"])
    sampling = dict(steps=2, guidance=3.0)
    cfg_a = FinetuneConfig(stage1_steps=2, stage2_steps=3, stage1_lr=1e-2, stage2_lr=1e-2, **FAST)
    shared = load_model(folder)
    b = make_session(tmp_path, photo, shared, "b")
    finetune(shared, b, FinetuneConfig(stage1_steps=2, stage2_steps=2, lora=True, lora_lr=1e-2, **FAST),
             progress=False)
    a = make_session(tmp_path, photo[::-1].copy(), shared, "a")
    reference = make_session(tmp_path, photo[::-1].copy(), shared, "a-fresh", session_id=a.id)  # comparable runs
    finetune(shared, a, cfg_a, progress=False, callback=finetune_stopping_at("stage2", 1))
    b_between = Editor(shared, b, progress=False).reconstruct(0, **sampling).images[0]
    assert finetune(shared, a, cfg_a, progress=False).completed                  # resumed after B ran
    editors = [Editor(shared, a, progress=False), Editor(shared, b, progress=False)]
    alternated = [editors[j % 2].reconstruct(0, **sampling).images[0] for j in range(4)]

    finetune(load_model(folder), reference, cfg_a, progress=False)
    for kind in ("tokens", "unet"):
        mine, fresh = Session.open(a.folder).load_weights(kind), reference.load_weights(kind)
        assert set(mine) == set(fresh) and all(torch.allclose(mine[n], fresh[n], atol=1e-6) for n in mine)
    alone_a = Editor(load_model(folder), Session.open(a.folder), progress=False).reconstruct(0, **sampling).images[0]
    alone_b = Editor(load_model(folder), Session.open(b.folder), progress=False).reconstruct(0, **sampling).images[0]
    assert not np.array_equal(alone_a, alone_b)
    for j, image in enumerate(alternated):
        assert np.array_equal(image, alone_a if j % 2 == 0 else alone_b), j
    assert np.array_equal(b_between, alone_b)

    shared.delta.reset_unet()
    pristine = load_model(folder).unet.state_dict()
    state = shared.unet.state_dict()
    assert list(state) == list(pristine)
    assert all(torch.equal(state[n], pristine[n]) for n in pristine)


@pytest.mark.parametrize("lora", [False, True], ids=["attn", "lora"])
def test_an_edit_after_another_sessions_finetune_uses_its_own_weights_again(tmp_path, photo, tiny_model_dirs, lora):
    """Edit A, finetune B on the same model, edit A again: every finetune starts by resetting the UNet, so
    the model must not go on believing A's delta is in place (it would sample A with B's weights)."""
    from dedit_nb.edits import Editor
    folder = str(tiny_model_dirs["sd"])
    cfg = FinetuneConfig(stage1_steps=1, stage2_steps=2, stage2_lr=1e-1, lora=lora, lora_lr=1e-1, **FAST)
    sampling = dict(steps=2, guidance=3.0)
    shared = load_model(folder)
    a, b = make_session(tmp_path, photo, shared, "a"), make_session(tmp_path, photo[::-1].copy(), shared, "b")
    finetune(shared, a, cfg, progress=False)
    editor = Editor(shared, a, progress=False, record=False)
    before = editor.reconstruct(0, **sampling).images[0]
    finetune(shared, b, dataclasses.replace(cfg, seed=1), progress=False)
    learned, in_place = a.load_weights("unet"), []

    def check(pipe, step, timestep, callback_kwargs):
        params = {**dict(shared.unet.named_parameters()), **shared.delta.lora_parameters(session_adapter(a.id))}
        in_place.append(all(torch.equal(params[n], v.to(params[n])) for n, v in learned.items()))
        return callback_kwargs

    after = editor.reconstruct(0, callback_on_step_end=check, **sampling).images[0]
    assert in_place == [True, True]
    assert np.array_equal(after, before)
    alone = Editor(load_model(folder), Session.open(a.folder), progress=False, record=False)
    assert np.array_equal(alone.reconstruct(0, **sampling).images[0], before)
    b_unet = b.load_weights("unet")
    assert not all(torch.equal(b_unet[n], learned[n]) for n in learned)     # B's weights would have shown


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, photo, tiny_model_dirs):
    cfg = dict(stage1_steps=2, stage2_steps=2, stage1_lr=1e-2, stage2_lr=1e-2, **FAST)
    weights = []
    first = make_session(tmp_path, photo, load_model(str(tiny_model_dirs["sdxl"])), "first")
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = load_model(str(tiny_model_dirs["sdxl"]))
        s = first.copy_to(tmp_path / name)     # the same session id, so the same token names
        during = []
        finetune(model, s, FinetuneConfig(gradient_checkpointing=checkpointing, **cfg), progress=False,
                 callback=lambda p, stage, step, kw, m=model: during.append(m.unet.is_gradient_checkpointing) or kw)
        assert during == [checkpointing] * 4
        assert not model.unet.is_gradient_checkpointing                 # switched off again after the finetune
        weights.append({**s.load_weights("tokens"), **s.load_weights("unet")})
    assert all(torch.allclose(weights[0][n], weights[1][n], atol=1e-6) for n in weights[0])


def test_starting_over_on_the_same_model_redraws_the_tokens(tmp_path, photo, tiny_model_dirs):
    """resume=False on a model that already holds the session's learned tokens ends where the first run did."""
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    cfg = FinetuneConfig(stage1_steps=2, stage2_steps=1, stage1_lr=1e-2, **FAST)
    finetune(model, s, cfg, progress=False)
    first = s.load_weights("tokens")
    finetune(model, s, cfg, progress=False, resume=False)
    again = s.load_weights("tokens")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_the_progress_callback_sees_each_step_s_loss_and_can_stop_the_finetune(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    cfg = FinetuneConfig(stage1_steps=2, stage2_steps=2, **FAST)
    seen = []

    def callback(run, stage, step, callback_kwargs):
        seen.append((stage, step, callback_kwargs["loss"], run.result.loss[stage][-1], run.config))
        if (stage, step) == ("stage2", 0):
            run.stop()
        return callback_kwargs

    result = finetune(model, s, cfg, progress=False, callback=callback)
    assert [(stage, step) for stage, step, *_ in seen] == [("stage1", 0), ("stage1", 1), ("stage2", 0)]
    assert all(loss == last for _, _, loss, last, _ in seen) and all(c is cfg for *_, c in seen)
    assert [loss for *_, loss, _, _ in seen] == result.loss["stage1"] + result.loss["stage2"]
    assert not result.completed and (s.finetune_state["stage"], s.finetune_state["step"]) == (2, 1)


def test_finetune_callbacks_of_another_form_are_refused_by_name(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = make_session(tmp_path, photo, model)
    cfg = FinetuneConfig(stage1_steps=2, stage2_steps=0, **FAST)
    with pytest.raises(TypeError, match=r"callback\(run, stage, step, callback_kwargs\)"):
        finetune(model, s, cfg, progress=False, callback=lambda stage, step, loss: None)    # the form of before
    assert s.finetune_state is None and not s.has_weights
    with pytest.raises(TypeError, match=r"returned bool.*run\.stop\(\)"):             # the old way to stop
        finetune(model, s, cfg, progress=False, callback=lambda run, stage, step, kw: False)
    assert Session.open(s.folder).finetune_state is None
