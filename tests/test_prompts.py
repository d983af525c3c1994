"""Nothing is cut from a prompt silently: learned item tokens never, other words with a warning and a record."""
import pytest
import torch

from dedit_nb.conditioning import PromptTooLongError
from dedit_nb.edits import Editor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.models import load_model
from dedit_nb.session import Session
from conftest import three_item_labels

# the tiny models' tokenizer makes one token of every character (and one of every item token)
CFG = FinetuneConfig(num_tokens=2, stage1_steps=1, stage2_steps=1)
SAMPLING = dict(steps=2, guidance=1.0, edge_thickness=2)


@pytest.fixture
def session(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["sd"]))
    s = Session.create(tmp_path / "s", photo, resolution=16, multiple=model.latent_factor)
    h, w = s.images[0].labels.shape
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    return model, s


def test_an_item_template_that_pushes_its_tokens_past_the_limit_is_refused(session):
    model, s = session
    s.set_template(0, "right", "a" * 37 + " *")      # 37 + start + end leave room for one of its 2 tokens
    with pytest.raises(PromptTooLongError, match=r"item 'right'.*40 tokens.*<\w+"):
        finetune(model, s, CFG, progress=False)
    assert not s.has_weights
    s.set_template(0, "right", "a" * 36 + " *")      # exactly 40 tokens: fits
    finetune(model, s, CFG, progress=False)


def test_an_overlong_edit_prompt_warns_with_the_dropped_words_and_records_what_was_encoded(session):
    model, s = session
    finetune(model, s, CFG, progress=False)
    editor = Editor(model, s, progress=False)
    prompt = "a red bag " + "x" * 70 + " with golden straps"
    with pytest.warns(UserWarning, match=r"item 'left'.*77 tokens.*dropped: 'x+ with golden straps'"):
        result = editor.text(0, "left", prompt, **SAMPLING)
    encoded = result.manifest["prompts"]["left"]
    assert encoded.startswith("a red bag xxx") and "golden" not in encoded
    assert result.manifest["dropped"]["left"].endswith("with golden straps")
    assert set(result.manifest["dropped"]) == {"left"}
    with pytest.raises(PromptTooLongError, match="item 'left'"):
        editor.text(0, "left", "x" * 80 + " in the style of *", **SAMPLING)   # its own tokens would be cut


def test_sdxl_pooled_embedding_is_read_at_the_end_of_text_even_with_the_legacy_config_id(tiny_model_dirs):
    """Real SD/SDXL text-encoder configs say ``eos_token_id: 2``, for which transformers pools at the highest token
    id: an added item token. The pooled embedding SDXL conditions on must come from the end-of-text token."""
    model = load_model(str(tiny_model_dirs["sdxl"]))
    slot = model.conditioner.slots[1]
    assert slot.gives_pooled and slot.encoder.config.eos_token_id == 2      # the legacy value, as in SDXL's
    token = model.conditioner.add_tokens(["<item-7>"], generator=torch.Generator().manual_seed(0))[0]
    prompt = f"a {token} cat"
    _, pooled = model.conditioner.encode([prompt], 16)
    ids = slot.tokenizer([prompt], padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = slot.encoder(ids)
    end = int((ids[0] == slot.tokenizer.eos_token_id).int().argmax())
    at_item = int(ids[0].argmax())
    assert ids[0, at_item] == slot.tokenizer.convert_tokens_to_ids(token) and at_item < end
    expected = slot.encoder.text_projection(out.last_hidden_state[0, end])
    torch.testing.assert_close(pooled[0], expected)
    # transformers' own text_embeds with this config read the item token: what the engine must not use
    assert not torch.allclose(out.text_embeds[0], expected)
    # each prompt of a batch at its own end of text
    prompts = [prompt, f"{token} on a long table by the window"]
    _, pooled = model.conditioner.encode(prompts, 40)
    ids = slot.tokenizer(prompts, padding="max_length", max_length=40, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = slot.encoder(ids).last_hidden_state
    ends = [int((row == slot.tokenizer.eos_token_id).int().argmax()) for row in ids]
    assert ends[0] != ends[1]
    for j, end in enumerate(ends):
        torch.testing.assert_close(pooled[j], slot.encoder.text_projection(states[j, end]))
