"""The offline demo model: its scenes, its resumable training script, and the shipped weights."""
import itertools
import json
import re

import numpy as np
import pytest
import torch

from dedit_nb.models import OFFLINE_MODEL_DIR, load_model
from dedit_nb.offline import train as T
from dedit_nb.offline import scenes as W
from dedit_nb.offline.scenes import HELD_OUT, SHAPES, random_scene, shape_mask


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_scenes_come_with_a_partition_and_never_draw_held_out_pairs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        assert scene.labels.max() == len(scene.objects)
        assert all((scene.labels == k).any() for k in range(len(scene.objects) + 1))
        assert not {(o.colour, o.shape) for o in scene.objects} & HELD_OUT
        assert len(scene.item_phrases) == len(scene.objects) + 1
        assert scene.caption.endswith("background")
    held = random_scene(np.random.default_rng(1), held_out=True)
    assert (held.objects[0].colour, held.objects[0].shape) in HELD_OUT
    for shape in SHAPES:
        assert shape_mask(shape, 32, 16, 16, 8).sum() > 50


def test_learning_rate_legs_decay_restart_warm_and_appending_a_leg_keeps_the_prefix():
    one = (T.Leg(10_000, 1e-3, 4_000),)
    two = one + (T.Leg(15_000, 5e-4, 4_000, warmup_steps=1_000),)
    rates = [T.learning_rate(s, two) for s in range(15_000)]
    assert rates[:6_000] == [1e-3] * 6_000
    first, warmup, second = rates[6_000:10_000], rates[10_000:11_000], rates[11_000:]
    assert all(a >= b for a, b in zip(first, first[1:])) and first[-1] == pytest.approx(2e-5, rel=0.01)
    assert all(a < b for a, b in zip(warmup, warmup[1:])) and warmup[-1] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(second, second[1:])) and second[-1] == pytest.approx(1e-5, rel=0.01)
    assert [T.learning_rate(s, one) for s in range(10_000)] == rates[:10_000]
    with pytest.raises(ValueError, match="past the schedule"):
        T.learning_rate(15_000, two)


def test_training_resumes_to_the_same_weights(tmp_path):
    # interrupted inside the second leg's warm-up, so the resumed leg must pick up the schedule
    # (the second leg also trains the grounding loss)
    # (and words its scenes from the trained vocabulary, with noise and dropout on the text states)
    schedule = (T.Leg(2, 1e-3, 1), T.Leg(4, 5e-4, 1, warmup_steps=2, grounding=0.1, vocabulary=W.TRAINED,
                                         text_noise=0.3, token_dropout=0.1))
    kwargs = dict(minutes=5, batch=4, checkpoint_every=10, schedule=schedule)
    T.train(tmp_path / "straight", **kwargs)
    assert T.train(tmp_path / "resumed", stop_at=3, **kwargs) == 3
    assert T.train(tmp_path / "resumed", stop_at=1, **kwargs) == 3    # already past it: nothing trained
    T.train(tmp_path / "resumed", **kwargs)
    a = json.loads((tmp_path / "straight" / "state.json").read_text())
    b = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert a["step"] == b["step"] == 4 and np.allclose(a["loss"], b["loss"])
    from safetensors.torch import load_file
    ta, tb = (load_file(str(tmp_path / run / "state.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta if k.startswith("ema."))
    target = T.export(tmp_path / "straight", tmp_path / "exported", schedule=schedule)
    model = load_model(str(target))
    assert model.family == "offline" and model.vae is None and model.conditioner.max_length == T.TEXT_LENGTH
    assert json.loads((target / "model_index.json").read_text())["_dedit_schedule_legs"] == 2


def test_a_run_can_start_at_a_leg_end_from_exported_weights(tmp_path):
    schedule = (T.Leg(2, 1e-3, 1), T.Leg(4, 5e-4, 1, vocabulary=W.TRAINED, text_noise=0.3))
    kwargs = dict(minutes=5, batch=4, checkpoint_every=10, schedule=schedule)
    T.train(tmp_path / "first", stop_at=2, **kwargs)
    exported = T.export(tmp_path / "first", tmp_path / "exported", schedule=schedule)
    assert T.train(tmp_path / "second", init=exported, **kwargs) == 4
    state = json.loads((tmp_path / "second" / "state.json").read_text())
    assert state["step"] == 4 and len(state["loss"]) == 2           # only the second leg's steps were trained
    with pytest.raises(ValueError, match="not the end of a leg"):
        T.export(tmp_path / "second", tmp_path / "mid", schedule=(T.Leg(3, 1e-3, 1), T.Leg(6, 1e-3, 1)))
    T.export(tmp_path / "second", tmp_path / "mid", schedule=(T.Leg(3, 1e-3, 1), T.Leg(6, 1e-3, 1)), mid_leg=True)
    with pytest.raises(ValueError, match="not at the end of a leg"):   # exported at 4, inside this schedule's leg
        T.train(tmp_path / "third", init=tmp_path / "mid", **dict(kwargs, schedule=(T.Leg(3, 1e-3, 1),
                                                                                      T.Leg(6, 1e-3, 1))))


class RecordingPhrases(T.PhraseCache):
    def __init__(self, text):
        super().__init__(text)
        self.seen = set()

    def __call__(self, prompts):
        self.seen.update(prompts)
        return super().__call__(prompts)


def test_a_worded_leg_draws_the_same_scenes_in_trained_words_only():
    from dedit_nb.models import TextConditioner, _minilm_slot
    phrases = RecordingPhrases(TextConditioner([_minilm_slot(torch.float32)]))
    plain = T.Leg(10, 1e-3, 1)
    worded = T.Leg(10, 1e-3, 1, vocabulary=W.TRAINED)
    held_template_words = words(W.HELD_OUT_TEMPLATE) - set().union(*map(words, W.CAPTION_TEMPLATES)) - {"a"}
    for step in range(6):
        a = T.make_batch(step, 0, 32, 16, 0.5, phrases, plain)
        before = set(phrases.seen)
        b = T.make_batch(step, 0, 32, 16, 0.5, phrases, worded)
        assert torch.equal(a.images, b.images) and torch.equal(a.scene_labels, b.scene_labels)
        new = phrases.seen - before
        assert len(new) >= 8 and not any(words(p) & (W.HELD_OUT_WORDS | held_template_words) for p in phrases.seen)
        assert all(phrases.fits(p) for p in phrases.seen)
        c = T.make_batch(step, 0, 32, 16, 0.5, phrases, None)     # no leg: the first legs' plain batches
        assert torch.equal(a.states, c.states) and torch.equal(a.token_items, c.token_items)
        # a leg's plain share: 1 keeps every caption in the plain words, 0 none
        drawn = np.random.default_rng([0, step])                  # the batch's scenes, as make_batch draws them
        plain_captions = {random_scene(drawn, 32).caption for _ in range(16)}
        for share in (1.0, 0.0):
            phrases.seen.clear()
            T.make_batch(step, 0, 32, 16, 0.0, phrases, T.Leg(10, 1e-3, 1, vocabulary=W.TRAINED, plain_share=share))
            captions = phrases.seen - {""}
            assert len(captions) >= 12 and (captions <= plain_captions if share else not captions & plain_captions)


def test_text_state_noise_and_dropout_spare_the_empty_captions():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(3, 200, 384) * 5
    worded = torch.tensor([True, False, True])
    out = T.perturb_text_states(states, worded, 0.3, 0.1, gen)
    assert torch.equal(out[1], states[1])
    dropped = (out[[0, 2]] == 0).all(-1)
    assert 0.05 < dropped.float().mean() < 0.15
    kept = ~dropped
    ratio = (out[[0, 2]] - states[[0, 2]])[kept].pow(2).mean() / states[[0, 2]][kept].pow(2).mean()
    assert ratio.sqrt().item() == pytest.approx(0.3, rel=0.05)


def test_caption_tokens_know_which_item_each_word_names():
    from dedit_nb.models import _minilm_slot
    tokenizer = _minilm_slot(torch.float32).tokenizer
    rng = np.random.default_rng(3)
    for n in (1, 2, 3):
        scene = random_scene(rng, num_objects=n)
        items = T.caption_token_items(scene.caption_parts, tokenizer)
        ids = tokenizer(scene.caption, max_length=T.TEXT_LENGTH, padding="max_length")["input_ids"]
        words = tokenizer.convert_ids_to_tokens(ids)
        assert len(items) == T.TEXT_LENGTH
        named = {k: [w for w, i in zip(words, items.tolist()) if i == k] for k in range(n + 1)}
        assert named[0] == [scene.background, "background"]
        assert all(named[k] == [o.colour, o.shape] for k, o in enumerate(scene.objects, start=1))
        assert {w for w, i in zip(words, items.tolist()) if i < 0} <= {"[CLS]", "[SEP]", "[PAD]", "a", "an", ",",
                                                                       "and", "on"}


def test_trained_wording_never_uses_a_held_out_word_or_template_and_the_held_out_wording_does():
    rng = np.random.default_rng(4)
    held_template_words = words(W.HELD_OUT_TEMPLATE) - set().union(*map(words, W.CAPTION_TEMPLATES)) - {"a"}
    assert W.HELD_OUT_WORDS and held_template_words       # "picture", "against"
    seen = {colour: set() for colour in W.COLOUR_WORDS}
    for _ in range(400):
        scene = W.reword(random_scene(rng), rng, W.TRAINED)
        for text in [scene.caption] + scene.item_phrases:
            assert not words(text) & (W.HELD_OUT_WORDS | held_template_words), text
        for colour in seen:
            seen[colour] |= {w for w in W.COLOUR_WORDS[colour] if re.search(rf"\b{w}\b", scene.caption)}
    # every trained synonym of every colour turns up
    assert all(found == set(W.COLOUR_WORDS[c]) - W.HELD_OUT_WORDS for c, found in seen.items())
    held = W.reword(random_scene(rng, num_objects=1), rng, W.HELD_OUT_VOCABULARY)
    assert held.caption.startswith("a picture of ") and " against " in held.caption
    plain = W.Scene(held.image, held.labels, held.background, held.objects)
    assert W.reword(held, rng, W.PLAIN).caption == plain.caption and plain.caption.endswith(" background")
    with pytest.raises(ValueError, match="unknown vocabulary"):
        W.reword(held, rng, "fancy")


def test_caption_words_name_their_own_item_in_every_template_and_vocabulary():
    # the grounding loss pulls each item's words onto its pixels: a word given to the wrong item, or a colour
    # or shape word left as glue, would teach the model to bind wrongly
    from dedit_nb.models import _minilm_slot
    tokenizer = _minilm_slot(torch.float32).tokenizer
    rng = np.random.default_rng(6)
    fits = lambda c: len(tokenizer(c)["input_ids"]) <= T.TEXT_LENGTH     # noqa: E731
    content = set().union(*map(words, [*itertools.chain(*W.COLOUR_WORDS.values(), *W.SHAPE_WORDS.values(),
                                                        *W.SIZE_WORDS.values()), *W.BACKGROUND_NOUNS]))
    for template, vocabulary, n in itertools.product(W.CAPTION_TEMPLATES + (W.HELD_OUT_TEMPLATE,),
                                                     (W.TRAINED, W.HELD_OUT_VOCABULARY), (1, 2, 3)):
        for _ in range(4):
            scene = W.reword(random_scene(rng, num_objects=n), rng, vocabulary, fits=fits, template=template)
            items = T.caption_token_items(scene.caption_parts, tokenizer).tolist()
            ids = tokenizer(scene.caption, max_length=T.TEXT_LENGTH, padding="max_length")["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(ids)
            assert len(ids) == T.TEXT_LENGTH, scene.caption          # nothing truncated
            named = {k: tokenizer.convert_tokens_to_string([t for t, i in zip(tokens, items) if i == k])
                     for k in range(n + 1)}
            bg_colours, bg_nouns = W.COLOUR_WORDS[scene.background], W.BACKGROUND_NOUNS
            assert named[0] in {f"{c} {b}" for c in bg_colours for b in bg_nouns}, (scene.caption, named)
            for k, obj in enumerate(scene.objects, start=1):
                size = W.size_class(obj, 32, n)
                sizes = [""] + [f"{s} " for s in W.SIZE_WORDS.get(size, ())]
                expected = {f"{s}{a} {b}" for s in sizes for c in W.COLOUR_WORDS[obj.colour]
                            for shape in W.SHAPE_WORDS[obj.shape] for a, b in ((c, shape), (shape, c))}
                assert named[k] in expected, (scene.caption, k, named[k])
            glue = [t for t, i in zip(tokens, items) if i < 0 and t not in ("[CLS]", "[SEP]", "[PAD]")]
            assert not words(" ".join(glue)) & content, (scene.caption, glue)


def test_grounding_loss_is_zero_when_words_and_pixels_keep_to_their_item_and_two_when_they_swap():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 1          # item 1 is the top-left quarter, item 2 the bottom-right: whole cells at 4x4
    labels[:, 4:, 4:] = 2
    # the second element is not a caption sample (a grouped one): it never counts, whatever its attention
    token_items = torch.tensor([[-1, 1, 1, 2, 0, -1], [-1] * 6])
    cover = torch.nn.functional.avg_pool2d(torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float(), 2)

    def attention(where):   # (2, 16 cells, 6 keys) at 4x4: key j spreads evenly over the cells of item where[j]
        probs = torch.stack([cover[0, k].flatten() / cover[0, k].sum() for k in where], dim=-1)
        return torch.stack([probs, torch.rand(16, 6)])

    on_own = attention([0, 1, 1, 2, 0, 0])
    assert T.grounding_loss([on_own], labels, token_items).item() == pytest.approx(0.0, abs=1e-6)
    # every word on another item, so every pixel takes only other items' words: 1 + 1
    on_other = attention([0, 2, 0, 1, 1, 0])
    assert T.grounding_loss([on_other], labels, token_items).item() == pytest.approx(2.0)
    uniform = torch.full((2, 16, 6), 1 / 16)
    # words: shares inside their item a quarter, a quarter, a quarter, a half; pixels: a cell sees item 1's two
    # words and one word each of items 2 and 0, so items 1 / 2 / 0 (4, 4, 8 cells) stray 1/2, 3/4, 3/4
    expected = (3 * 0.75 ** 2 + 0.5 ** 2) / 4 + (4 * 0.5 + 4 * 0.75 + 8 * 0.75) / 16
    assert T.grounding_loss([uniform, on_own], labels, token_items).item() == pytest.approx(expected / 2)
    assert T.grounding_loss([uniform], labels, torch.full((2, 6), -1)).item() == 0.0


def test_grounding_recorder_attends_like_the_grouped_processor():
    from dedit_nb.attention import grouped_attention, ItemLayout
    torch.manual_seed(0)
    labels = torch.from_numpy(np.stack([random_scene(np.random.default_rng(s), 8).labels for s in range(3)]))
    spans = [[(k * 4, k * 4 + 4) for k in range(int(l.max()) + 1)] for l in labels]
    layout = ItemLayout(labels, spans)
    q, k, v = torch.randn(3, 2, 64, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    recorder = T.GroundingRecorder()
    recorder.recording = True
    out = recorder.grouped(q, k, v, layout)
    assert torch.allclose(out, grouped_attention(q, k, v, layout), atol=1e-5)
    (weights,) = recorder.weights
    assert weights.shape == (3, 64, 16) and torch.allclose(weights.sum(-1), torch.ones(3, 64))
    assert (weights[~layout.key_mask(64, 16, torch.device("cpu"))[:, 0]] == 0).all()


@pytest.mark.skipif(not (OFFLINE_MODEL_DIR / "model_index.json").exists(), reason="offline model not trained yet")
def test_shipped_offline_model_draws_the_captioned_background():
    from dedit_nb import conditioning as C
    from dedit_nb import masks as M
    from dedit_nb.offline.scenes import BACKGROUND_COLOURS
    from dedit_nb.sampler import SamplingConfig, masked_sample
    model = load_model("offline")
    assert sum(f.stat().st_size for f in OFFLINE_MODEL_DIR.rglob("*")) < 20 * 2 ** 20
    every = M.Regions(np.zeros((32, 32), bool), np.zeros((32, 32), bool), np.ones((32, 32), bool))
    hits = 0
    for colour in ("yellow", "blue", "white", "black"):
        cond = C.encode_items(model, [f"a red circle on a {colour} background"], [C.TEXT_PROMPT_LENGTH])
        image = masked_sample(model, cond, torch.zeros(32, 32, dtype=torch.long), np.zeros((32, 32, 3), np.uint8),
                              every, SamplingConfig(steps=20, guidance=3.0, seed=1), progress=False)[0]
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float).mean(0)
        nearest = min(BACKGROUND_COLOURS, key=lambda c: ((np.array(BACKGROUND_COLOURS[c]) - border) ** 2).sum())
        hits += nearest == colour
    assert hits >= 3


@pytest.mark.parametrize("folder", [OFFLINE_MODEL_DIR, OFFLINE_MODEL_DIR.parent / "offline-model-candidate"],
                         ids=["shipped", "candidate"])
def test_shipped_weights_are_the_end_of_the_committed_schedule(folder):
    # appending a leg to SCHEDULE without training it and exporting would leave README and weights apart
    # (a leg may be appended and trained before its weights are chosen: the index says which leg they end).
    # The candidate (trained on, not shipped: see the README) must be a leg end too, so a run can start from it.
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_dedit_training_steps"] == T.SCHEDULE[index["_dedit_schedule_legs"] - 1].end
    assert sum(f.stat().st_size for f in folder.rglob("*")) < 20 * 2 ** 20
