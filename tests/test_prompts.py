"""Nothing is cut from a prompt silently: learned item tokens never, other words with a warning and a record."""
import pytest

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
