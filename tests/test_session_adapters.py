"""LoRA sessions on one shared model: each has its own peft adapter, switched with set_adapter; swapping back
and forth gives the same outputs as a model that only ever held that session; the adapters kept are bounded."""
import numpy as np
import pytest
import torch

from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import delta as delta_module
from dedit_nb.models import load_model, session_adapter
from dedit_nb.session import Session
from conftest import three_item_labels

LORA = dict(stage1_steps=1, stage2_steps=2, lora=True, lora_lr=1e-1, num_tokens=2, batch_size=1,
            checkpoint_every=2)


@pytest.fixture(scope="module")
def lora_sessions(tmp_path_factory, tiny_model_dirs):
    """Three LoRA-finetuned sessions of one tiny SD model (different seeds: different adapters)."""
    from skimage import data
    root, folder = tmp_path_factory.mktemp("adapters"), str(tiny_model_dirs["sd"])
    model = load_model(folder)
    sessions = []
    for seed, name in enumerate("abc"):
        s = Session.create(root / name, data.coffee(), resolution=32, multiple=model.latent_factor * 2)
        h, w = s.images[0].labels.shape
        s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
        finetune(model, s, FinetuneConfig(seed=seed, **LORA), progress=False)
        sessions.append(Session.open(s.folder))
    return folder, sessions


def prediction(model, session) -> torch.Tensor:
    """One UNet call with the session in place, on fixed inputs that reach every LoRA-wrapped layer."""
    model.use_session(session)
    states, _ = model.conditioner.encode([f"a photo of {' '.join(session.all_tokens())}"])
    latents = torch.randn(1, model.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.predict(latents, 500, states, None)


def alone(folder, session) -> torch.Tensor:
    """The session's prediction on a model that never held another session."""
    return prediction(load_model(folder), Session.open(session.folder))


def test_swapping_lora_sessions_back_and_forth_switches_adapters_and_gives_identical_outputs(lora_sessions):
    folder, (a, b, _) = lora_sessions
    shared = load_model(folder)
    first_a = prediction(shared, a)
    a_weights = list(shared.delta.lora_parameters(session_adapter(a.id)).values())
    first_b = prediction(shared, b)
    again_a = prediction(shared, a)
    assert list(shared.delta.adapters) == [session_adapter(b.id), session_adapter(a.id)]
    assert shared.unet.active_adapters() == [session_adapter(a.id)]
    # switched, not re-added: A's adapter is the same tensors as before B ran
    assert all(p is q for p, q in zip(a_weights, shared.delta.lora_parameters(session_adapter(a.id)).values()))
    assert torch.equal(again_a, first_a)
    assert torch.equal(first_a, alone(folder, a))      # B's adapter, loaded beside it, never touches A's output
    assert torch.equal(first_b, alone(folder, b))
    assert not torch.equal(first_a, first_b)


def test_a_session_without_learned_unet_weights_runs_the_loaded_unet_and_keeps_the_adapters(lora_sessions, tmp_path):
    folder, (a, _, _) = lora_sessions
    shared, base = load_model(folder), load_model(folder)
    tokens_only = a.copy_to(tmp_path / "tokens-only")   # item tokens, no UNet weights: a finetune stopped in stage 1
    tokens_only.save_weights({"tokens": a.load_weights("tokens"), "unet": {}}, a.model_id, a.weights_meta,
                             {**a.finetune_state, "stage": 1, "step": 1, "done": False})
    assert not tokens_only.load_weights("unet")
    prediction(shared, a)
    assert torch.equal(prediction(shared, tokens_only), prediction(base, tokens_only))
    assert list(shared.delta.adapters) == [session_adapter(a.id)]       # kept for a swap back to A
    assert torch.equal(prediction(shared, a), alone(folder, a))


def test_adapters_beyond_the_limit_are_evicted_least_recently_used_first(lora_sessions, monkeypatch):
    folder, (a, b, c) = lora_sessions
    monkeypatch.setattr(delta_module, "MAX_SESSION_ADAPTERS", 2)
    shared = load_model(folder)
    expected = {s.id: prediction(shared, s) for s in (a, b)}
    prediction(shared, a)                                   # A used after B: B is the least recently used
    expected[c.id] = prediction(shared, c)
    assert list(shared.delta.adapters) == [session_adapter(a.id), session_adapter(c.id)]
    assert set(shared.unet.peft_config) == {session_adapter(a.id), session_adapter(c.id)}
    assert not shared.delta.lora_parameters(session_adapter(b.id))   # B's weights are gone from the UNet
    for s in (b, a, c):                                     # evicted B comes back from its file
        assert torch.equal(prediction(shared, s), expected[s.id]), s.id
    assert len(shared.delta.adapters) == 2
