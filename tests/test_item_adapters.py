"""Per-item adapters routed by the item map: an item's cross-attention output depends on its own adapter only."""
import numpy as np
import pytest
import torch

from dedit_nb.attention import GroupedAttnProcessor, ItemLayout, cross_attention_layers
from dedit_nb.models.adapters import ItemAdapters

H, W = 6, 5
SPANS = [[(0, 4), (4, 7), (7, 12)], [(0, 3), (3, 9), (9, 12)]]
SLOTS = [[0, 1, -1], [2, 0, 1]]


def labels():
    lab = torch.zeros(2, H, W, dtype=torch.long)
    lab[0, :, 3:] = 1
    lab[0, :2] = 2
    lab[1, 3:] = 1
    lab[1, :, :1] = 2
    return lab


def random_adapters(unet, slots=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adapters = ItemAdapters.fresh(unet, [f"<k{m}>" for m in range(slots)], rank=2, alpha=2.0, generator=gen)
    for v in adapters.tensors.values():
        v.copy_(torch.randn(v.shape, generator=gen) * 0.3)
    return adapters


def layer_inputs(tiny_model, seed=1):
    name, attn = cross_attention_layers(tiny_model.unet)[0]
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, H * W, attn.to_q.in_features, generator=gen)
    states = torch.randn(2, 12, attn.to_k.in_features, generator=gen)
    return attn, hidden, states


def dense(attn, hidden, states, lab, adapters):
    """The formula, pixel by pixel: own item's keys only, each projection plus its item's LoRA."""
    name = adapters.layer_names[attn]
    out = torch.zeros(2, H * W, attn.to_q.out_features)
    for b in range(2):
        for n, k in enumerate(lab[b].flatten().tolist()):
            s, e = SPANS[b][k]
            m = SLOTS[b][k]

            def proj(p, x):
                y = getattr(attn, p)(x)
                if m >= 0:
                    a, bb = adapters.tensors[f"{name}.{p}.lora_A"][m], adapters.tensors[f"{name}.{p}.lora_B"][m]
                    y = y + x @ a.T @ bb.T * adapters.scale
                return y
            q, key, v = proj("to_q", hidden[b, n:n + 1]), proj("to_k", states[b, s:e]), proj("to_v", states[b, s:e])
            d = q.shape[-1] // attn.heads
            q, key, v = (t.view(-1, attn.heads, d).transpose(0, 1) for t in (q, key, v))
            w = torch.softmax(q @ key.transpose(-1, -2) / d ** 0.5, dim=-1)
            out[b, n] = (w @ v).transpose(0, 1).reshape(-1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("masked_above", [2, 0], ids=["sorted", "masked"])
@pytest.mark.parametrize("family", ["sd"])
def test_grouped_paths_with_adapters_agree_with_the_dense_formula(tiny_model, masked_above):
    attn, hidden, states = layer_inputs(tiny_model)
    adapters = random_adapters(tiny_model.unet)
    layout = ItemLayout(labels(), SPANS, adapters, SLOTS)
    with torch.no_grad():
        got = GroupedAttnProcessor(masked_above)(attn, hidden, states, item_layout=layout)
        want = dense(attn, hidden, states, labels(), adapters)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("masked_above", [2, 0], ids=["sorted", "masked"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_other_items_adapters_leave_an_items_pixels_bit_identical(tiny_model, masked_above):
    """Slot 0 is item 0 of element 0 and item 1 of element 1: replacing every other slot by random weights
    changes nothing at those pixels, at every cross-attention layer of the UNet."""
    adapters = random_adapters(tiny_model.unet)
    others = random_adapters(tiny_model.unet, seed=5)
    for key, value in others.tensors.items():
        value[0] = adapters.tensors[key][0]
    mine = torch.stack([labels()[0] == 0, labels()[1] == 1]).flatten(1)
    for name, attn in cross_attention_layers(tiny_model.unet):
        gen = torch.Generator().manual_seed(3)
        hidden = torch.randn(2, H * W, attn.to_q.in_features, generator=gen)
        states = torch.randn(2, 12, attn.to_k.in_features, generator=gen)
        with torch.no_grad():
            a = GroupedAttnProcessor(masked_above)(attn, hidden, states, item_layout=ItemLayout(
                labels(), SPANS, adapters, SLOTS))
            b = GroupedAttnProcessor(masked_above)(attn, hidden, states, item_layout=ItemLayout(
                labels(), SPANS, others, SLOTS))
        assert torch.equal(a[mine], b[mine]), name
        assert not torch.equal(a[~mine], b[~mine])   # the other items' pixels did change


@pytest.mark.parametrize("family", ["sd"])
def test_items_without_a_slot_are_the_plain_grouped_attention(tiny_model):
    attn, hidden, states = layer_inputs(tiny_model)
    none = [[-1, -1, -1], [-1, -1, -1]]
    with torch.no_grad():
        routed = GroupedAttnProcessor()(attn, hidden, states, item_layout=ItemLayout(
            labels(), SPANS, random_adapters(tiny_model.unet), none))
        plain = GroupedAttnProcessor()(attn, hidden, states, item_layout=ItemLayout(labels(), SPANS))
    assert torch.equal(routed, plain)


def test_a_layout_needs_adapters_and_slots_together():
    with pytest.raises(ValueError, match="together"):
        ItemLayout(labels(), SPANS, slots=SLOTS)
    with pytest.raises(ValueError, match="one adapter slot per item"):
        ItemLayout(labels(), SPANS, object(), [[0, 1], [0, 1, 2]])


# --- per-item finetune -------------------------------------------------------------------------------------
from dedit_nb import conditioning as C   # noqa: E402
from dedit_nb.edits import Editor   # noqa: E402
from dedit_nb.images import rgb_to_tensor   # noqa: E402
from dedit_nb.finetune import FinetuneConfig, finetune   # noqa: E402
from dedit_nb.models import load_model   # noqa: E402
from dedit_nb.session import Session   # noqa: E402
from conftest import finetune_stopping_at, three_item_labels   # noqa: E402

PER_ITEM = dict(num_tokens=2, batch_size=1, checkpoint_every=2, stage1_steps=2, stage1_lr=1e-2, per_item=True,
                lora_lr=2e-2)


def per_item_session(tmp_path, photo, model, name="s", session_id=None):
    s = Session.create(tmp_path / name, photo, resolution=32, multiple=model.latent_factor * 2, session_id=session_id)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    return s


def fixed_loss(model, session, adapters) -> float:
    """The denoising loss of the session's image over fixed noises and timesteps (not the finetune's draws)."""
    entry = session.image(0)
    latents = model.encode_images(rgb_to_tensor(entry.working))
    prompts = [it.prompt() for it in entry.items]
    cond = C.encode_items(model, prompts, [C.ITEM_PROMPT_LENGTH] * 3)
    cond.slots, cond.adapters = adapters.slots_for(prompts), adapters
    states, layout, _ = C.batch([cond] * 8, [C.latent_labels(model, entry.labels, 3)] * 8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((8, *latents.shape[1:]), generator=gen)
    t = torch.linspace(50, 950, 8).long()
    noisy = model.training_scheduler().add_noise(latents.expand(8, -1, -1, -1), noise, t)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.predict(noisy, t, states, layout), noise))


@pytest.mark.parametrize("family", ["sd"])
def test_per_item_stage2_trains_each_items_adapter_and_lowers_the_loss(tmp_path, photo, tiny_model):
    s = per_item_session(tmp_path, photo, tiny_model)
    finetune(tiny_model, s, FinetuneConfig(stage2_steps=12, **PER_ITEM), progress=False)
    assert s.weights_meta["mode"] == "per_item" and s.weights_meta["base"]["weights_sha256"]
    saved = s.load_weights("unet")
    assert {k.split("/")[0] for k in saved} == {it.tokens[0] for it in s.image(0).items}
    tiny_model.use_session(s)
    trained = tiny_model.delta.item_adapters
    untrained = ItemAdapters(tiny_model.unet, {k: torch.zeros_like(v) if k.endswith("lora_B") else v
                                               for k, v in trained.tensors.items()}, 4, 4.0, keys=trained.keys)
    assert fixed_loss(tiny_model, s, trained) < fixed_loss(tiny_model, s, untrained)
    assert all(p.requires_grad is False for p in trained.tensors.values())


def test_per_item_finetune_resumes_to_the_same_adapters(tmp_path, photo, tiny_model_dirs):
    cfg = FinetuneConfig(stage2_steps=4, **PER_ITEM)
    model = load_model(str(tiny_model_dirs["sd"]))
    straight = per_item_session(tmp_path, photo, model, "straight")
    finetune(model, straight, cfg, progress=False)
    interrupted = per_item_session(tmp_path, photo, model, "interrupted", session_id=straight.id)
    assert not finetune(model, interrupted, cfg, progress=False,
                        callback=finetune_stopping_at("stage2", 1)).completed
    assert finetune(load_model(str(tiny_model_dirs["sd"])), Session.open(tmp_path / "interrupted"), cfg,
                    progress=False).completed
    a, b = straight.load_weights("unet"), Session.open(tmp_path / "interrupted").load_weights("unet")
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.parametrize("family", ["sd"])
def test_a_per_item_session_reconstructs_and_edits_with_its_items_adapters(tmp_path, photo, tiny_model):
    s = per_item_session(tmp_path, photo, tiny_model)
    finetune(tiny_model, s, FinetuneConfig(stage2_steps=2, **PER_ITEM), progress=False)
    editor = Editor(tiny_model, s, progress=False, record=False)
    routed = editor.reconstruct(0, steps=2, seed=3).images[0]
    adapters = tiny_model.delta.item_adapters
    items = s.image(0).items
    assert adapters.slots_for([items[2].prompt(), "a red bag", items[0].prompt("a photo of *")]) == [2, -1, 0]
    tiny_model.delta.item_adapters = None           # the same sampling without the adapters differs
    editor.model.use_session = lambda session: None
    assert not np.array_equal(routed, editor.reconstruct(0, steps=2, seed=3).images[0])


def test_per_item_mode_replaces_the_shared_lora():
    with pytest.raises(ValueError, match="per_item=True"):
        FinetuneConfig(per_item=True, lora=True)


# --- bank files ------------------------------------------------------------------------------------------
import json   # noqa: E402

from dedit_nb.bank import BankFileError, files as bank_files   # noqa: E402
from dedit_nb.bank.__main__ import main as bank_cli   # noqa: E402
from dedit_nb.session import SessionError   # noqa: E402


@pytest.fixture
def banked(tmp_path, photo, tiny_model_dirs):
    """A per-item session of the tiny SD model with its 'top' item exported, and a fresh session to import into."""
    model = load_model(str(tiny_model_dirs["sd"]))
    source = per_item_session(tmp_path, photo, model, "source")
    finetune(model, source, FinetuneConfig(stage2_steps=2, **PER_ITEM), progress=False)
    path = source.export_item(0, "top", tmp_path / "bank" / "top")
    target = per_item_session(tmp_path, photo[::-1].copy(), model, "target")
    return model, source, path, target


def test_an_exported_item_holds_its_tokens_adapter_crop_and_base_model(banked):
    model, source, path, _ = banked
    assert path.suffix == ".safetensors" and path.exists()
    item = bank_files.read(path)
    top = source.image(0).items[2]
    assert (item.name, item.template, item.rank) == ("top", top.template, 4)
    assert item.base == source.weights_meta["base"]
    rows = source.load_weights("tokens")
    assert [item.rows[f"0/{t}"].tolist() for t in item.tokens] == [rows[f"0/{t}"].tolist() for t in top.tokens]
    adapter = {k.split("/", 1)[1]: v for k, v in source.load_weights("unet").items() if k.startswith(top.tokens[0])}
    assert set(item.adapter) == set(adapter)
    assert all(torch.equal(item.adapter[k], adapter[k].half()) for k in adapter)
    labels = source.image(0).labels
    assert item.mask.shape == item.crop.shape[:2] and item.mask.sum() == (labels == 2).sum()
    assert np.array_equal(item.crop[item.mask], source.image(0).working[labels == 2])


def test_a_bank_file_of_sd15_at_rank_4_is_under_1_mb():
    from dedit_nb.memory.configs import model_from_configs
    assert bank_files.file_size(model_from_configs("sd15"), num_tokens=5, rank=4) <= 1_000_000


def test_importing_adds_a_bank_item_without_training_and_once(banked, tmp_path):
    model, _, path, target = banked
    assert target.import_item(path, model=model) == "top"
    assert target.import_item(path) == "top"                       # the same file again: no second entry
    again = Session.open(target.folder)
    [entry] = again.bank_items
    assert (target.folder / entry["file"]).read_bytes() == path.read_bytes()
    assert not again.has_weights                                   # nothing was trained
    assert again.bank_item("top").tokens == bank_files.read(path).tokens
    other = tmp_path / "copy.safetensors"
    other.write_bytes(bank_files.to_bytes(dataclasses_replace(bank_files.read(path), template="a *")))
    assert target.import_item(other) == "top-2"                    # another item of that name: numbered


def dataclasses_replace(item, **changes):
    import dataclasses
    return dataclasses.replace(item, **changes)


def test_a_bank_item_of_another_base_model_is_refused_by_name(banked, tmp_path, photo):
    from dedit_nb.testing import build_tiny_model
    _, _, path, target = banked
    other = load_model(str(build_tiny_model("sd", tmp_path / "other-model", seed=7)))
    with pytest.raises(SessionError, match="made on the model .*, not on .*other-model"):
        target.import_item(path, model=other)
    assert "bank" not in json.loads((target.folder / "session.json").read_text())


def test_bad_bank_files_get_clear_errors(banked, tmp_path):
    from safetensors.torch import save_file
    _, _, path, target = banked
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(BankFileError, match="not a readable safetensors file"):
        target.import_item(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(BankFileError, match="not a bank item"):
        bank_files.read(plain)
    item = bank_files.read(path)
    next(iter(item.adapter.values()))[0, 0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    broken.write_bytes(bank_files.to_bytes(item))
    with pytest.raises(BankFileError, match="NaN"):
        bank_files.read(broken)
    with pytest.raises(BankFileError, match="is not a file"):
        bank_files.read(tmp_path / "missing.safetensors")


def test_exporting_never_replaces_a_users_file(banked, tmp_path):
    _, source, path, _ = banked
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's")
    for overwrite in (False, True):
        with pytest.raises((FileExistsError, BankFileError)):
            source.export_item(0, "left", mine, overwrite=overwrite)
    assert mine.read_bytes() == b"the user's"
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(FileExistsError, match="link"):
        source.export_item(0, "left", link, overwrite=True)
    with pytest.raises(FileExistsError, match="exists"):
        source.export_item(0, "left", path)
    assert bank_files.read(path).name == "top"
    assert bank_files.read(source.export_item(0, "left", path, overwrite=True)).name == "left"


def test_only_per_item_sessions_export(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = per_item_session(tmp_path, photo, model)
    finetune(model, s, FinetuneConfig(stage2_steps=1, **{**PER_ITEM, "per_item": False}), progress=False)
    with pytest.raises(SessionError, match="per_item=True"):
        s.export_item(0, "top", tmp_path / "x")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_bank_command_lists_shows_exports_and_imports(banked, tmp_path, capsys):
    _, source, path, target = banked
    assert bank_cli(["export", str(source.folder), "0", "left", str(tmp_path / "bank" / "left")]) == 0
    capsys.readouterr()
    assert bank_cli(["list", str(tmp_path / "bank")]) == 0
    assert [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()] == [
        ["left.safetensors", "left"], ["top.safetensors", "top"]]
    assert bank_cli(["show", str(path)]) == 0
    assert "name: top" in capsys.readouterr().out
    assert bank_cli(["import", str(target.folder), str(path), "--name", "lamp"]) == 0
    assert bank_cli(["list", str(target.folder)]) == 0
    assert capsys.readouterr().out.startswith("lamp\nlamp\t")
    assert bank_cli(["export", str(source.folder), "0", "left", str(path)]) == 1
    assert "exists" in capsys.readouterr().err


def test_the_palette_imports_a_bank_item(banked, tmp_path):
    from widgets import ItemPalette, ItemState
    _, _, path, target = banked
    palette = ItemPalette(ItemState.from_session(target, 0), session=target)
    assert palette.import_button in palette.children[2].children
    palette.bank_path.value = str(path)
    palette.import_button.click()
    assert "imported bank item &#x27;top&#x27;" in palette.message.value
    assert [e["name"] for e in Session.open(target.folder).bank_items] == ["top"]
    assert palette.import_item(str(tmp_path / "<b>nothing</b>.safetensors")) is None
    assert "dedit-error" in palette.message.value and "&lt;b&gt;" in palette.message.value
    assert ItemPalette(ItemState.from_session(target, 0)).children[2].children[-1].description == "delete selected"
