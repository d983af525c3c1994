"""Quality of the offline model and of every D-Edit edit kind on it, read back by a programmatic detector.

    python benchmarks/offline_quality.py [--model offline] [--scenes 192] [--edit-scenes 6] [--steps 25] [--guidance 3]
        [--grid docs/generation.png]

Scenes and captions come from a random stream the training never drew from, and a share of them uses the
colour-shape pairs held out of training. The detector is fixed and simple (nearest palette colour; shape
from extent and solidity of the object's pixels); its accuracy on the ground-truth renders is printed first
as its own check, and it is not tuned to the model.

Generation: object colour (a captioned object's colour is found as a blob), shape (that blob's shape),
background colour; in two-object scenes also how often an object's colour came out in the other object's shape
(a binding error). D-Edit, per scene finetuned on its true items: reconstruction PSNR; text edit (the item
takes a new colour); move (the item's centroid moves by the asked shift, within 2 px); remove (the item's
colour is gone from its old area); image edit (an item of a second scene, finetuned jointly, appears with its
colour in the target region); and for every edit, pixels outside the active and soft regions identical.
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
from dedit_nb.offline.scenes import BACKGROUND_COLOURS, HELD_OUT, OBJECT_COLOURS, random_scene
from dedit_nb.sampler import SamplingConfig, masked_sample

SAMPLING = dict(steps=25, guidance=3.0)
GENERATION_METRICS = ("colour", "shape", "shape, 1 obj.", "shape, 2 obj.", "shape, 3 obj.", "swapped, 2 obj.",
                      "background", "held-out colour", "held-out shape")


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


def score_generation(scene, image, stats) -> None:
    background, objects = detect(image)
    stats["background"].append(background == scene.background)
    found = {c: s for c, s, _ in objects}
    for obj in scene.objects:
        stats["colour"].append(obj.colour in found)
        stats["shape"].append(found.get(obj.colour) == obj.shape)
        stats[f"shape, {len(scene.objects)} obj."].append(found.get(obj.colour) == obj.shape)
        if len(scene.objects) == 2:  # a binding error: the colour came out in the other object's shape
            other = next(o for o in scene.objects if o is not obj)
            stats["swapped, 2 obj."].append(other.shape != obj.shape and found.get(obj.colour) == other.shape)
        if (obj.colour, obj.shape) in HELD_OUT:
            stats["held-out colour"].append(obj.colour in found)
            stats["held-out shape"].append(found.get(obj.colour) == obj.shape)


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

def generation(model, n: int, rng, sampling: dict = SAMPLING, keep: int = 0) -> tuple[dict, list]:
    """The generation metrics over ``n`` scenes, and the first ``keep`` (scene, generated image) pairs."""
    stats, kept = {k: [] for k in GENERATION_METRICS}, []
    for i in range(n):
        scene = random_scene(rng, held_out=i % 4 == 0, num_objects=1 + i % 2)
        cond = C.encode_items(model, [scene.caption], [C.TEXT_PROMPT_LENGTH])
        blank = np.zeros(scene.image.shape, np.uint8)
        every = M.Regions(np.zeros(scene.labels.shape, bool), np.zeros(scene.labels.shape, bool),
                          np.ones(scene.labels.shape, bool))
        image = masked_sample(model, cond, torch.zeros(scene.labels.shape, dtype=torch.long), blank, every,
                              SamplingConfig(seed=i, **sampling), progress=False)[0]
        score_generation(scene, image, stats)
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
        ax.set_title(scene.caption.replace(" on ", "\non ").replace(" and ", "\nand "), fontsize=7)
        ax.set_xlabel("read: " + ", ".join(read), fontsize=7, color="green" if right else "#b00")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def d_edit(model, n: int, rng, workdir: Path, sampling: dict = SAMPLING) -> dict:
    stats = {k: [] for k in ("recon PSNR", "text", "move", "remove", "image", "preserved")}
    config = FinetuneConfig(num_tokens=3, stage1_steps=150, stage2_steps=150, stage1_lr=5e-3, stage2_lr=5e-4,
                            batch_size=4)
    for i in range(n):
        target = random_scene(rng, num_objects=2)
        donor = random_scene(rng, num_objects=1)
        sessions = []
        for name, scene in (("target", target), ("donor", donor)):
            s = Session.create(workdir / f"{i}-{name}", scene.image, resolution=32, multiple=8)
            s.set_items(0, scene.labels, ["background"] + [o.phrase for o in scene.objects])
            sessions.append(s)
        finetune(model, sessions[0], config, extra_sessions=[sessions[1]], progress=False)
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
    return stats


def detector_check(rng, n: int = 200) -> dict:
    stats = {k: [] for k in GENERATION_METRICS}
    for i in range(n):
        scene = random_scene(rng, held_out=i % 4 == 0)
        score_generation(scene, scene.image, stats)
    return stats


def table(title: str, stats: dict, targets: dict) -> None:
    print(f"\n{title}")
    print(f"{'metric':<18}{'value':>10}{'hits':>6}{'n':>6}{'target':>10}")
    for k, v in stats.items():
        if not v:
            continue
        value = float(np.mean(v))
        shown, hits = (f"{value:.1f}", "") if k.endswith("PSNR") else (f"{value:.1%}", f"{int(np.sum(v))}")
        print(f"{k:<18}{shown:>10}{hits:>6}{len(v):>6}{targets.get(k, ''):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--scenes", type=int, default=192)
    parser.add_argument("--edit-scenes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--steps", type=int, default=SAMPLING["steps"], help="sampling steps")
    parser.add_argument("--guidance", type=float, default=SAMPLING["guidance"], help="classifier-free guidance")
    parser.add_argument("--grid", type=Path, help="save the first 24 generated images with their captions here")
    args = parser.parse_args()
    sampling = dict(steps=args.steps, guidance=args.guidance)
    torch.set_grad_enabled(True)
    table("detector on ground-truth renders (its own check)", detector_check(np.random.default_rng(999)), {})
    model = load_model(args.model)
    start = time.time()
    gen, samples = generation(model, args.scenes, np.random.default_rng([args.seed, 1]), sampling,
                              keep=24 if args.grid else 0)
    table(f"generation from captions ({args.scenes} unseen scenes, {time.time() - start:.0f} s)", gen,
          {"colour": ">= 90%", "shape": ">= 70%", "background": ">= 95%"})
    if args.grid:
        save_grid(samples, args.grid)
        print(f"generated images: {args.grid}")
    workdir = Path(tempfile.mkdtemp(prefix="dedit-bench-"))
    try:
        start = time.time()
        edits = d_edit(model, args.edit_scenes, np.random.default_rng([args.seed, 2]), workdir, sampling)
        table(f"D-Edit ({args.edit_scenes} unseen scene pairs, {time.time() - start:.0f} s)", edits,
              {"text": ">= 80%", "move": ">= 80%", "remove": ">= 80%", "image": ">= 80%", "preserved": "100%"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
