"""Quality of the offline model and of every D-Edit edit kind on it, read back by a programmatic detector.

    python benchmarks/offline_quality.py [--model offline] [--scenes 96] [--edit-scenes 12] [--steps 25]
        [--guidance 3] [--grid docs/generation.png] [--seed 12345] [--skip-edits]

Scenes and captions come from a random stream the training never drew from (``--seed 777`` is the validation
stream for choices; the default seed is the fresh stream reported), and a share of them uses the colour-shape
pairs held out of training. Every scene is captioned three ways, each its own column: the plain words the first
legs trained on, the trained vocabulary (synonyms, templates, word orders, sizes), and the held-out vocabulary
(words and a template never in training; its colour / shape rows count only the objects whose colour / shape
word is held out). The detector is fixed and simple (nearest palette colour; shape from extent and solidity of
the object's pixels); its accuracy on the ground-truth renders is printed first as its own check, and it is not
tuned to the model. A table of the frozen MiniLM encoder's token states says how close each held-out word sits
to its trained synonyms (what could carry unseen words).

Generation: object colour (a captioned object's colour is found as a blob), shape (that blob's shape),
background colour; one-, two- and three-object scenes; in two-object scenes also how often an object's colour
came out in the other object's shape (a binding error). D-Edit, per scene finetuned on its true items:
reconstruction PSNR; text edit (the item takes a new colour; once with the plain words, once with a held-out
colour word in D-Edit's phrasings "a photo of * in scarlet" / "a scarlet *"); move (the item's centroid moves by
the asked shift, within 2 px); remove (the item's colour is gone from its old area); image edit (an item of a
second scene, finetuned jointly, appears with its colour in the target region); and for every edit, pixels
outside the active and soft regions identical.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.color import rgb2lab
from skimage.morphology import convex_hull_image

from dedit_nb import Editor, FinetuneConfig, Session, finetune, load_model
from dedit_nb import conditioning as C
from dedit_nb import masks as M
from dedit_nb.offline import scenes as W
from dedit_nb.offline.scenes import BACKGROUND_COLOURS, HELD_OUT, OBJECT_COLOURS, random_scene
from dedit_nb.sampler import SamplingConfig, masked_sample

SAMPLING = dict(steps=25, guidance=3.0)
GENERATION_METRICS = ("colour", "shape", "shape, 1 obj.", "shape, 2 obj.", "shape, 3 obj.", "swapped, 2 obj.",
                      "background", "held-out pairs: colour", "held-out pairs: shape")
VOCABULARIES = {"plain words": W.PLAIN, "trained words": W.TRAINED, "held-out words": W.HELD_OUT_VOCABULARY}


# --- the detector ----------------------------------------------------------------------------------------

def nearest(rgb, palette: dict) -> str:
    names = list(palette)
    ref = rgb2lab(np.array([palette[n] for n in names], np.uint8)[None])[0]
    lab = rgb2lab(np.clip(np.asarray(rgb), 0, 255).astype(np.uint8).reshape(1, 1, 3))[0, 0]
    return names[int(np.argmin(((ref - lab) ** 2).sum(1)))]


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    extent = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    solidity = mask.sum() / max(convex_hull_image(mask).sum(), 1)
    # thresholds from the renderer's geometry (single objects: cross solidity <= 0.85, triangle >= 0.89;
    # circle extent <= 0.88, square 1.0; triangle extent <= 0.60, circle >= 0.72)
    if solidity < 0.87:
        return "cross"
    if extent > 0.94:
        return "square"
    if extent > 0.66:
        return "circle"
    return "triangle"


def detect(image: np.ndarray):
    """(background colour, [(colour, shape, mask), ...]) of an image."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
    background = nearest(np.median(border, 0), BACKGROUND_COLOURS)
    lab = rgb2lab(image)
    bg_lab = rgb2lab(np.array(BACKGROUND_COLOURS[background], np.uint8).reshape(1, 1, 3))[0, 0]
    foreground = np.sqrt(((lab - bg_lab) ** 2).sum(-1)) > 25
    names = list(OBJECT_COLOURS)
    ref = rgb2lab(np.array([OBJECT_COLOURS[n] for n in names], np.uint8)[None])[0]
    per_pixel = np.argmin(((lab[..., None, :] - ref) ** 2).sum(-1), axis=-1)
    objects = []
    for k, name in enumerate(names):
        comp, n = ndi.label(foreground & (per_pixel == k))
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        blob = comp == (int(np.argmax(sizes)) + 1)
        if blob.sum() >= 12:
            objects.append((name, classify_shape(blob), blob))
    return background, objects


def item_words(scene, item: int) -> set[str]:
    """The words of the scene's caption that name ``item`` (0: the background)."""
    return set(" ".join(text for text, k in scene.caption_parts if k == item).split())


def score_generation(scene, image, stats, held_out_only: bool = False) -> None:
    """Score a generated image against its scene. ``held_out_only``: count colour, shape and background only
    where the caption names them with a held-out word (the held-out-words column)."""
    background, objects = detect(image)
    if not held_out_only or item_words(scene, 0) & W.HELD_OUT_WORDS:
        stats["background"].append(background == scene.background)
    if held_out_only:       # each held-out word on its own too: the encoder carries some and not others
        for word in item_words(scene, 0) & W.HELD_OUT_WORDS:
            stats.setdefault(f"{word} (background)", []).append(background == scene.background)
    found = {c: s for c, s, _ in objects}
    for k, obj in enumerate(scene.objects, start=1):
        held = item_words(scene, k) & W.HELD_OUT_WORDS
        colour_held = bool(held & set(W.COLOUR_WORDS[obj.colour]))
        shape_held = bool(held & set(W.SHAPE_WORDS[obj.shape]))
        if not held_out_only or colour_held:
            stats["colour"].append(obj.colour in found)
        if held_out_only:
            for word in held & set(W.COLOUR_WORDS[obj.colour]):
                stats.setdefault(f"{word} (colour)", []).append(obj.colour in found)
            for word in held & set(W.SHAPE_WORDS[obj.shape]):
                stats.setdefault(f"{word} (shape)", []).append(found.get(obj.colour) == obj.shape)
        if not held_out_only or shape_held:
            stats["shape"].append(found.get(obj.colour) == obj.shape)
            stats[f"shape, {len(scene.objects)} obj."].append(found.get(obj.colour) == obj.shape)
            if len(scene.objects) == 2:  # a binding error: the colour came out in the other object's shape
                other = next(o for o in scene.objects if o is not obj)
                stats["swapped, 2 obj."].append(other.shape != obj.shape and found.get(obj.colour) == other.shape)
        if (obj.colour, obj.shape) in HELD_OUT and not held_out_only:
            stats["held-out pairs: colour"].append(obj.colour in found)
            stats["held-out pairs: shape"].append(found.get(obj.colour) == obj.shape)


def colour_share(image, mask, colour) -> float:
    if not mask.any():
        return 0.0
    names = list(OBJECT_COLOURS)
    lab = rgb2lab(image)
    ref = rgb2lab(np.array([OBJECT_COLOURS[n] for n in names], np.uint8)[None])[0]
    nearest_idx = np.argmin(((lab[mask][:, None, :] - ref) ** 2).sum(-1), axis=-1)
    close = np.sqrt(((lab[mask] - ref[names.index(colour)]) ** 2).sum(-1)) < 30
    return float(((nearest_idx == names.index(colour)) & close).mean())


# --- runs --------------------------------------------------------------------------------------------------

def generation(model, n: int, seed: int, vocabulary: str, sampling: dict = SAMPLING, keep: int = 0
               ) -> tuple[dict, list]:
    """The generation metrics over ``n`` scenes worded from ``vocabulary``, and the first ``keep`` (scene,
    generated image) pairs. Every vocabulary gets the same scenes (one to three objects in turn) and noise."""
    stats, kept = {k: [] for k in GENERATION_METRICS}, []
    scenes, words = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 3])
    tokenizer = model.conditioner.slots[0].tokenizer
    fits = lambda caption: len(tokenizer(caption)["input_ids"]) <= model.conditioner.max_length     # noqa: E731
    for i in range(n):
        scene = random_scene(scenes, held_out=i % 4 == 0, num_objects=1 + i % 3)
        if vocabulary != W.PLAIN:
            scene = W.reword(scene, words, vocabulary, fits=fits)
        cond = C.encode_items(model, [scene.caption], [C.TEXT_PROMPT_LENGTH])
        blank = np.zeros(scene.image.shape, np.uint8)
        every = M.Regions(np.zeros(scene.labels.shape, bool), np.zeros(scene.labels.shape, bool),
                          np.ones(scene.labels.shape, bool))
        image = masked_sample(model, cond, torch.zeros(scene.labels.shape, dtype=torch.long), blank, every,
                              SamplingConfig(seed=i, **sampling), progress=False)[0]
        score_generation(scene, image, stats, held_out_only=vocabulary == W.HELD_OUT_VOCABULARY)
        if i < keep:
            kept.append((scene, image))
    return stats, kept


def save_grid(samples: list, path: Path, columns: int = 6) -> None:
    """Generated images under their captions, with what the detector read back beneath each (green: every
    object found in its captioned colour and shape)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = -(-len(samples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.9 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[len(samples):]:
        ax.axis("off")
    for ax, (scene, image) in zip(axes.ravel(), samples):
        found = {c: s for c, s, _ in detect(image)[1]}
        read = [f"{o.colour} {found.get(o.colour, 'missing')}" for o in scene.objects]
        right = all(found.get(o.colour) == o.shape for o in scene.objects)
        ax.imshow(image, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_title(wrap(scene.caption), fontsize=7)
        ax.set_xlabel("read: " + ", ".join(read), fontsize=7, color="green" if right else "#b00")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wrap(caption: str, width: int = 30) -> str:
    lines, line = [], ""
    for word in caption.split():
        if line and len(line) + len(word) >= width:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


EDIT_STATS = ("recon PSNR", "text", "text, held-out word", "move", "remove", "image", "preserved")
D_EDIT_CONFIG = dict(num_tokens=3, stage1_steps=150, stage2_steps=150, stage1_lr=5e-3, stage2_lr=5e-4, batch_size=4)


def scene_pair(rng, workdir: Path, i: int):
    """The i-th D-Edit case: a two-object target scene and a one-object donor, each a session with its true
    items (named by their phrases), in ``workdir``. Returns (target, donor, [target session, donor session])."""
    target = random_scene(rng, num_objects=2)
    donor = random_scene(rng, num_objects=1)
    sessions = []
    for name, scene in (("target", target), ("donor", donor)):
        s = Session.create(workdir / f"{i}-{name}", scene.image, resolution=32, multiple=8)
        s.set_items(0, scene.labels, ["background"] + [o.phrase for o in scene.objects])
        sessions.append(s)
    return target, donor, sessions


def d_edit(model, n: int, rng, workdir: Path, sampling: dict = SAMPLING) -> dict:
    stats = {k: [] for k in EDIT_STATS}
    for i in range(n):
        target, donor, sessions = scene_pair(rng, workdir, i)
        finetune(model, sessions[0], FinetuneConfig(**D_EDIT_CONFIG), extra_sessions=[sessions[1]], progress=False)
        score_edits(model, sessions, target, donor, i, stats, sampling)
    return stats


def score_edits(model, sessions, target, donor, i: int, stats: dict, sampling: dict = SAMPLING) -> None:
    """Reconstruct the finetuned target scene and run each edit kind on it, adding to ``stats``."""
    held_colours = {c: w for c, words in W.COLOUR_WORDS.items() for w in words if w in W.HELD_OUT_WORDS}
    editor = Editor(model, sessions[0], progress=False, record=False)
    original = target.image
    results = []
    recon = editor.reconstruct(0, **sampling, seed=i)
    mse = ((recon.images[0].astype(float) - original) ** 2).mean()
    stats["recon PSNR"].append(10 * np.log10(255 ** 2 / max(mse, 1e-8)))
    obj = target.objects[0]
    new_colour = next(c for c in OBJECT_COLOURS if c not in (obj.colour, target.background)
                      and c not in {o.colour for o in target.objects})
    text = editor.text(0, 1, f"a {new_colour} {obj.shape}", **sampling, seed=i, edge_thickness=2)
    stats["text"].append(colour_share(text.images[0], target.labels == 1, new_colour) > 0.5)
    results.append(text)
    taken = {obj.colour, target.background} | {o.colour for o in target.objects}
    held_colour = next(c for c in held_colours if c not in taken)
    word = held_colours[held_colour]
    prompt = f"a photo of * in {word}" if i % 2 == 0 else f"{W.article(word)} {word} *"
    held_text = editor.text(0, 1, prompt, **sampling, seed=i, edge_thickness=2)
    stats["text, held-out word"].append(colour_share(held_text.images[0], target.labels == 1, held_colour) > 0.5)
    results.append(held_text)
    dx, dy = (6 if obj.cx < 16 else -6), (5 if obj.cy < 16 else -5)
    move = editor.move(0, {1: (dx, dy)}, **sampling, seed=i, edge_thickness=2)
    _, objs = detect(move.images[0])
    moved = [m for c, _, m in objs if c == obj.colour]
    if moved:
        ys, xs = np.nonzero(target.labels == 1)
        my, mx = np.nonzero(moved[0])
        stats["move"].append(abs(mx.mean() - xs.mean() - dx) <= 2 and abs(my.mean() - ys.mean() - dy) <= 2)
    else:
        stats["move"].append(False)
    results.append(move)
    remove = editor.remove(0, 1, **sampling, seed=i, edge_thickness=2)
    stats["remove"].append(colour_share(remove.images[0], target.labels == 1, obj.colour) < 0.1)
    results.append(remove)
    image = editor.image(0, 1, 0, 1, source_session=sessions[1], **sampling, seed=i, edge_thickness=2)
    stats["image"].append(colour_share(image.images[0], target.labels == 1, donor.objects[0].colour) > 0.5)
    results.append(image)
    for r in results:
        stats["preserved"].append(all(np.array_equal(img[r.regions.hard], original[r.regions.hard])
                                      for img in r.images))


def detector_check(rng, n: int = 200) -> dict:
    stats = {k: [] for k in GENERATION_METRICS}
    for i in range(n):
        scene = random_scene(rng, held_out=i % 4 == 0)
        score_generation(scene, scene.image, stats)
    return stats


def table(title: str, stats: dict, targets: dict) -> None:
    print(f"\n{title}")
    print(f"{'metric':<22}{'value':>10}{'hits':>6}{'n':>6}{'target':>10}")
    for k, v in stats.items():
        if not v:
            continue
        value = float(np.mean(v))
        shown, hits = (f"{value:.1f}", "") if k.endswith("PSNR") else (f"{value:.1%}", f"{int(np.sum(v))}")
        print(f"{k:<22}{shown:>10}{hits:>6}{len(v):>6}{targets.get(k, ''):>10}")


def columns(title: str, by_column: dict[str, dict], targets: dict[str, dict]) -> None:
    """Metrics as rows, one column (value, hits/n, target) per vocabulary."""
    print(f"\n{title}")
    print(f"{'metric':<22}" + "".join(f"{name:>30}" for name in by_column))
    for k in GENERATION_METRICS:
        cells = []
        for name, stats in by_column.items():
            v = stats[k]
            target = targets.get(name, {}).get(k, "")
            cells.append(f"{np.mean(v):.1%} ({int(np.sum(v))}/{len(v)}) {target}" if v else "-")
        print(f"{k:<22}" + "".join(f"{c:>30}" for c in cells))


@torch.no_grad()
def word_table(model) -> None:
    """How close the frozen encoder puts each held-out word to its trained synonyms: cosine of the word's token
    states (mean over its tokens, in a fixed sentence) to its own trained synonyms (mean, best) and to the best
    word of another colour / shape; and what a ridge probe fitted on the trained words' states (four sentences
    each) reads the held-out word as. The UNet's cross-attention is linear in the states, so the probe is a
    fair guess of what it can carry to an unseen word. The same ridge probe on MiniLM's sentence embeddings
    (mean of the token states, normalised: what the encoder was trained to make similar for synonyms), at
    three regularisations, says whether the encoder carries the word's meaning at all."""
    tokenizer = model.conditioner.slots[0].tokenizer

    def state(sentence: str, word: str) -> np.ndarray:
        start = sentence.index(word)
        offsets = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
        idx = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= start + len(word)]
        states, _ = model.conditioner.encode([sentence], model.conditioner.max_length)
        return states[0, idx].float().mean(0).cpu().numpy()

    def sentence_embedding(sentence: str) -> np.ndarray:
        """MiniLM's own use: the mean of its token states over the sentence, normalised."""
        n = len(tokenizer(sentence)["input_ids"])
        states, _ = model.conditioner.encode([sentence], model.conditioner.max_length)
        mean = states[0, :n].float().mean(0).cpu().numpy()
        return mean / np.linalg.norm(mean)

    def ridge_reads(x, y, held, classes, lam):
        mean = x[~held].mean(0)
        targets = np.eye(len(classes))[y[~held]]
        a = x[~held] - mean
        probe = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (targets - targets.mean(0)))
        return ((x - mean) @ probe).argmax(1)

    print("\nMiniLM token states: held-out words against their trained synonyms")
    print(f"{'word':<9}{'means':>9}{'cos own (mean/best)':>21}{'best other':>22}{'probe reads':>14}"
          f"{'sentence probe, lambda 0.1 / 1 / 10':>40}")
    for table_words, sentences in (
            (W.COLOUR_WORDS, ("a {} circle on a gray background", "a square in {} on a black background",
                              "a photo of a {} cross", "a {} background")),
            (W.SHAPE_WORDS, ("a red {} on a gray background", "a {} in blue", "a photo of a green {}",
                             "a yellow {} and a blue circle"))):
        classes = list(table_words)
        entries = [(c, w) for c, ws in table_words.items() for w in ws]
        first = np.stack([state(sentences[0].format(w), w) for _, w in entries])
        first /= np.linalg.norm(first, axis=1, keepdims=True)
        cos = first @ first.T
        x = np.stack([state(t.format(w), w) for _, w in entries for t in sentences])
        y = np.repeat([classes.index(c) for c, _ in entries], len(sentences))
        held = np.repeat([w in W.HELD_OUT_WORDS for _, w in entries], len(sentences))
        reads = ridge_reads(x, y, held, classes, 10)
        pooled = np.stack([sentence_embedding(t.format(w)) for _, w in entries for t in sentences])
        pooled_reads = {lam: ridge_reads(pooled, y, held, classes, lam) for lam in (0.1, 1, 10)}
        for i, (c, w) in enumerate(entries):
            if w not in W.HELD_OUT_WORDS:
                continue
            own = [j for j, (c2, w2) in enumerate(entries) if c2 == c and w2 not in W.HELD_OUT_WORDS]
            other = [j for j, (c2, w2) in enumerate(entries) if c2 != c and w2 not in W.HELD_OUT_WORDS]
            best = other[int(np.argmax(cos[i, other]))]
            rows = slice(i * len(sentences), (i + 1) * len(sentences))
            votes = np.bincount(reads[rows], minlength=len(classes))
            sentence_votes = [np.bincount(r[rows], minlength=len(classes)) for r in pooled_reads.values()]
            sentence_cells = " / ".join(f"{classes[int(v.argmax())]} {v.max()}" for v in sentence_votes)
            print(f"{w:<9}{c:>9}{cos[i, own].mean():>14.2f} / {cos[i, own].max():.2f}"
                  f"{cos[i, best]:>11.2f} {entries[best][1]:<11}{classes[int(votes.argmax())]:>9} "
                  f"{votes.max()}/{len(sentences)}{sentence_cells:>40}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--scenes", type=int, default=96, help="scenes per column (each column words them anew)")
    parser.add_argument("--edit-scenes", type=int, default=12)
    parser.add_argument("--skip-edits", action="store_true", help="generation only (for validation runs)")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--steps", type=int, default=SAMPLING["steps"], help="sampling steps")
    parser.add_argument("--guidance", type=float, default=SAMPLING["guidance"], help="classifier-free guidance")
    parser.add_argument("--grid", type=Path, help="save the first 24 generated images with their captions here")
    args = parser.parse_args()
    sampling = dict(steps=args.steps, guidance=args.guidance)
    torch.set_grad_enabled(True)
    table("detector on ground-truth renders (its own check)", detector_check(np.random.default_rng(999)), {})
    model = load_model(args.model)
    word_table(model)
    start = time.time()
    by_column, samples = {}, []
    for name, vocabulary in VOCABULARIES.items():
        by_column[name], kept = generation(model, args.scenes, args.seed, vocabulary, sampling,
                                           keep=24 if args.grid and vocabulary == W.TRAINED else 0)
        samples += kept
    trained = {"colour": ">=95%", "shape": ">=85%", "background": ">=95%", "shape, 2 obj.": ">=75%",
               "swapped, 2 obj.": "<=5%"}
    columns(f"generation from captions ({args.scenes} unseen scenes per column, {time.time() - start:.0f} s)",
            by_column, {"plain words": trained, "trained words": trained,
                        "held-out words": {"colour": ">=80%", "shape": ">=70%", "background": ">=95%"}})
    held = by_column["held-out words"]
    table("held-out words one by one (what each asked for, read back)",
          {k: held[k] for k in sorted(held) if k not in GENERATION_METRICS}, {})
    if args.grid:
        save_grid(samples, args.grid)
        print(f"generated images: {args.grid}")
    if args.skip_edits:
        return
    workdir = Path(tempfile.mkdtemp(prefix="dedit-bench-"))
    try:
        start = time.time()
        edits = d_edit(model, args.edit_scenes, np.random.default_rng([args.seed, 2]), workdir, sampling)
        table(f"D-Edit ({args.edit_scenes} unseen scene pairs, {time.time() - start:.0f} s)", edits,
              {"text": ">= 90%", "text, held-out word": ">= 90%", "move": ">= 90%", "remove": ">= 90%",
               "image": ">= 90%", "preserved": "100%"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
