"""The item layout reaches the attention processors while finetuning and while sampling, and every finetune
step draws its own noise and timestep. Only public entry points run; a recording processor watches."""
import numpy as np
import pytest
import torch

from dedit_nb import conditioning as C
from dedit_nb.attention import GroupedAttnProcessor
from dedit_nb.edits import Editor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.images import rgb_to_tensor
from dedit_nb.models import load_model
from dedit_nb.session import Session
from conftest import three_item_labels


class RecordingProcessor(GroupedAttnProcessor):
    """Grouped attention that remembers every item layout it was given."""

    def __init__(self):
        super().__init__()
        self.layouts = []

    def grouped(self, query, key, value, layout):
        self.layouts.append(layout)
        return super().grouped(query, key, value, layout)


def session_with_items(tmp_path, photo, model):
    s = Session.create(tmp_path / "s", photo, resolution=32, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    labels = three_item_labels(h, w)
    labels[h // 2:, : w // 4] = 2                 # not a block pattern: the majority vote matters
    s.set_items(0, labels, ["left", "right", "top"])
    return s


def cross_attention_layers(model) -> int:
    return sum(name.endswith("attn2.processor") for name in model.unet.attn_processors)


@pytest.fixture
def sd(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["sd"]))


def test_finetune_gives_the_processors_the_item_layout_and_new_noise_every_step(tmp_path, photo, sd):
    s = session_with_items(tmp_path, photo, sd)
    recorder = RecordingProcessor()
    sd.unet.set_attn_processor(recorder)
    calls = []
    predict = sd.predict

    def recording_predict(latents, t, states, layout, pooled=None):
        calls.append((latents.detach().clone(), torch.as_tensor(t).detach().clone()))
        return predict(latents, t, states, layout, pooled)

    sd.predict = recording_predict
    finetune(sd, s, FinetuneConfig(num_tokens=1, stage1_steps=3, stage2_steps=3), progress=False)

    expected = C.latent_labels(sd, s.images[0].labels, 3)
    assert len(recorder.layouts) == 6 * cross_attention_layers(sd)
    for layout in recorder.layouts:
        assert torch.equal(layout.labels, expected[None])
        assert [len(spans) for spans in layout.spans] == [3]
    assert len(calls) == 6
    for i in range(6):
        for j in range(i):
            assert not torch.equal(calls[i][0], calls[j][0]), (i, j)       # new noise every step
    assert len({int(t) for _, t in calls}) > 1                              # and new timesteps


def test_sampling_gives_the_processors_the_edited_item_map_and_the_unconditional_branch_one_prompt(
        tmp_path, photo, sd):
    s = session_with_items(tmp_path, photo, sd)
    finetune(sd, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    recorder = RecordingProcessor()
    sd.unet.set_attn_processor(recorder)
    editor = Editor(sd, s, progress=False, record=False)
    result = editor.move(0, {"top": (0, 6)}, steps=2, guidance=3.0, num_images=2)
    edited = C.latent_labels(sd, result.labels, 3)
    assert not torch.equal(edited, C.latent_labels(sd, s.images[0].labels, 3))
    assert len(recorder.layouts) == 2 * cross_attention_layers(sd)
    for layout in recorder.layouts:
        assert torch.equal(layout.labels[:2], edited.expand(2, -1, -1))          # conditional half
        assert (layout.labels[2:] == 0).all()                                  # unconditional half
        assert [len(spans) for spans in layout.spans] == [3, 3, 1, 1]
    recorder.layouts.clear()
    editor.reconstruct(0, steps=2, guidance=1.0)
    assert len(recorder.layouts) == 2 * cross_attention_layers(sd)
    assert [len(spans) for spans in recorder.layouts[0].spans] == [3]
    assert torch.equal(recorder.layouts[0].labels[0], C.latent_labels(sd, s.images[0].labels, 3))
    assert np.array_equal(s.images[0].labels, Session.open(s.folder).images[0].labels)


def test_finetune_loss_is_the_distance_to_the_noise_each_step_drew(tmp_path, photo, sd):
    """With the UNet's prediction zeroed, each step's loss is the mean square of the noise added to the
    image's latents at the step's timestep: the epsilon target, recovered from the noisy latents."""
    s = session_with_items(tmp_path, photo, sd)
    clean = sd.encode_images(rgb_to_tensor(s.images[0].working))
    alphas = sd.training_scheduler().alphas_cumprod
    predict, calls = sd.predict, []

    def zero_predict(latents, t, states, layout, pooled=None):
        calls.append((latents.detach().clone(), int(torch.as_tensor(t).reshape(-1)[0])))
        return predict(latents, t, states, layout, pooled) * 0.0

    sd.predict = zero_predict
    result = finetune(sd, s, FinetuneConfig(num_tokens=1, stage1_steps=2, stage2_steps=2), progress=False)
    losses = result.loss["stage1"] + result.loss["stage2"]
    assert len(calls) == len(losses) == 4
    for (noisy, t), loss in zip(calls, losses):
        noise = (noisy - alphas[t].sqrt() * clean) / (1 - alphas[t]).sqrt()
        assert loss == pytest.approx(float((noise ** 2).mean()), rel=1e-3)


def test_latent_item_map_takes_each_blocks_majority():
    from types import SimpleNamespace
    labels = np.array([[1, 1, 0, 2],
                       [1, 0, 2, 2],
                       [0, 0, 2, 2],
                       [0, 1, 1, 2]])
    small = C.latent_labels(SimpleNamespace(vae_scale=2), labels, 3)
    assert small.tolist() == [[1, 2], [0, 2]]
