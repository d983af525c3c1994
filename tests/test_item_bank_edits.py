"""Edits with banked items: an item learned in one session put into another without training either."""
import numpy as np
import pytest
import torch

from dedit_nb.attention import GroupedAttnProcessor, ItemLayout, cross_attention_layers
from dedit_nb.bank import files as bank_files
from dedit_nb.bank.use import bank_adapters
from dedit_nb.batch import check_run
from dedit_nb.edits import Editor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model
from dedit_nb.models.adapters import ItemAdapters, split_by_item
from dedit_nb.notebook import headless_edit
from dedit_nb.parameters import ParameterError
from dedit_nb.session import Session, SessionError
from conftest import three_item_labels

FAST = dict(num_tokens=2, batch_size=1, stage1_steps=2, stage2_steps=2, stage1_lr=1e-2, lora_lr=2e-2)
SAMPLING = dict(steps=2, guidance=3.0, strength=0.5, edge_thickness=2, seed=1)


def make(folder, photo, model, mode):
    s = Session.create(folder, photo, resolution=32, multiple=model.latent_factor * 2)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    finetune(model, s, FinetuneConfig(per_item=mode == "per_item", lora=mode == "lora", **FAST), progress=False)
    return s


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_model_dirs):
    from skimage import data
    root = tmp_path_factory.mktemp("bank")
    model = load_model(str(tiny_model_dirs["sd"]))
    source = make(root / "source", data.coffee(), model, "per_item")
    path = source.export_item(0, "top", root / "top")
    return model, root, path


@pytest.fixture(scope="module")
def receivers(bank):
    from skimage import data
    model, root, _ = bank
    return {mode: make(root / mode, data.astronaut(), model, mode) for mode in ("attn", "lora", "per_item")}


def hard_pixels_kept(result, original) -> bool:
    return all(np.array_equal(img[result.regions.hard], original[result.regions.hard]) for img in result.images)


@pytest.mark.parametrize("mode", ["attn", "lora", "per_item"])
def test_an_image_edit_takes_its_source_from_a_bank_file_without_training(bank, receivers, mode):
    model, _, path = bank
    session = receivers[mode]
    generation = session.weights_generation
    editor = Editor(model, session, progress=False, record=False)
    result = editor.run(0, [{"kind": "image", "item": "left", "source_item_file": str(path)}], **SAMPLING)
    assert result.manifest["params"]["source_item"] == "top"
    assert result.manifest["prompts"]["left"] == bank_files.read(path).prompt()
    assert hard_pixels_kept(result, session.image(0).working)
    assert not np.array_equal(result.images[0], editor.reconstruct(0, **SAMPLING).images[0])
    assert Session.open(session.folder).weights_generation == generation      # nothing was trained or saved


@pytest.mark.parametrize("mode", ["attn", "lora"])
def test_a_banked_items_pixels_see_the_base_weights_and_its_own_adapter(bank, receivers, mode):
    """In a session with a shared delta in place, the banked item's pixels get what they would get on the
    model as loaded with the item's adapter; every other pixel gets the session's delta as without the bank."""
    model, _, path = bank
    item = bank_files.read(path)
    labels = torch.zeros(1, 6, 5, dtype=torch.long)
    labels[0, 2:, 1:4] = 1
    spans, slots = [[(0, 5), (5, 9)]], [[-1, 0]]
    banked = (labels == 1).flatten(1)
    model.use_session(receivers[mode])
    with torch.no_grad():
        routed = {}
        for name, attn in cross_attention_layers(model.unet):
            gen = torch.Generator().manual_seed(2)
            hidden = torch.randn(1, 30, attn.to_q.in_features, generator=gen)
            states = torch.randn(1, 9, attn.to_k.in_features, generator=gen)
            routed[name] = (hidden, states, GroupedAttnProcessor()(attn, hidden, states, item_layout=ItemLayout(
                labels, spans, bank_adapters(model, receivers[mode], [item]), slots)),
                GroupedAttnProcessor()(attn, hidden, states, item_layout=ItemLayout(labels, spans)))
        model.delta.reset_unet()
        alone = ItemAdapters.combine(model.unet, {item.key: (item.adapter, item.rank, item.alpha)})
        for name, attn in cross_attention_layers(model.unet):
            hidden, states, with_bank, without = routed[name]
            base = GroupedAttnProcessor()(attn, hidden, states, item_layout=ItemLayout(labels, spans, alone, slots))
            assert torch.allclose(with_bank[banked], base[banked], atol=1e-6), name
            assert not torch.allclose(with_bank[banked], without[banked], atol=1e-4), name
            assert torch.equal(with_bank[~banked], without[~banked]), name


def test_a_per_item_session_keeps_its_items_adapters_beside_a_bank_item(bank, receivers):
    model, _, path = bank
    session, item = receivers["per_item"], bank_files.read(path)
    model.use_session(session)
    adapters = bank_adapters(model, session, [item])
    own = split_by_item(session.load_weights("unet"))
    prompts = [it.prompt() for it in session.image(0).items] + [item.prompt(), "a red bag"]
    slots = adapters.slots_for(prompts)
    assert slots[:3] == [adapters.keys.index(it.tokens[0]) for it in session.image(0).items] and slots[4] == -1
    assert adapters.keys[slots[3]] == item.key and not adapters.base
    name = next(iter(own[adapters.keys[0]]))
    if name.endswith("lora_A"):
        name = name.replace("lora_A", "lora_B")
    assert torch.allclose(adapters.tensors[name][0], own[adapters.keys[0]][name])   # alpha / rank = 1 folded in


def test_add_draws_a_bank_item_where_the_user_asks(bank, receivers):
    model, _, path = bank
    session = receivers["attn"]
    editor = Editor(model, session, progress=False, record=False)
    result = editor.run(0, [{"kind": "add", "name": "lamp", "source_item_file": str(path), "box": [0, 0, 16, 16]}],
                        **SAMPLING)
    assert (result.labels[:16, :16] == 3).all() and (result.labels == 3).sum() == 256
    assert result.manifest["prompts"]["lamp"] == bank_files.read(path).prompt()
    assert hard_pixels_kept(result, session.image(0).working)


def test_an_imported_bank_item_is_named_by_its_name_and_replays(bank, receivers, tmp_path):
    model, _, path = bank
    session = receivers["lora"]
    session.import_item(path, name="lamp")
    result = headless_edit(model, session, "image", tmp_path / "out", item="right", source_item_file="lamp",
                           progress=False, record=False, **SAMPLING)
    [op] = result.manifest["request"]["operations"]
    assert op["source_item_file"] == "lamp"
    again = Editor(model, session, progress=False, record=False).replay(tmp_path / "out")
    assert all(np.array_equal(a, b) for a, b in zip(result.images, again.images))


def test_a_bank_item_of_another_model_is_refused_at_edit_time(bank, tmp_path, photo):
    from dedit_nb.testing import build_tiny_model
    _, _, path = bank
    other = load_model(str(build_tiny_model("sd", tmp_path / "other-model", seed=7)))
    session = make(tmp_path / "s", photo, other, "attn")
    editor = Editor(other, session, progress=False)
    with pytest.raises(SessionError, match="made on the model .*, not on .*other-model"):
        editor.run(0, [{"kind": "image", "item": 0, "source_item_file": str(path)}], **SAMPLING)
    assert not Session.open(session.folder).history


def test_a_bad_source_item_file_names_the_parameter(bank, receivers, tmp_path):
    model, _, _ = bank
    editor = Editor(model, receivers["attn"], progress=False, record=False)
    (tmp_path / "x.safetensors").write_bytes(b"not one")
    for ref in (tmp_path / "x.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(ParameterError) as caught:
            editor.run(0, [{"kind": "image", "item": 0, "source_item_file": str(ref)}], **SAMPLING)
        assert caught.value.name == "source_item_file"
    with pytest.raises(ParameterError, match="source_item_file"):
        editor.run(0, [{"kind": "image", "item": 0}], **SAMPLING)


def test_grid_runs_of_03_take_source_item_file():
    check_run("03_edit", {"edit": "image", "item": 1, "source_item_file": "items/cup.safetensors"})
    with pytest.raises(Exception, match="source_item_file"):
        check_run("03_edit", {"source_item_file": 3})
