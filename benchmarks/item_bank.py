"""Bank edits against joint-finetune image edits on the offline model, and per-item against shared recon.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/item_bank.py [--pairs 12] [--seed 12345] [--lora-lr 5e-3]
        [--steps 150]
        [--shard K/N --results DIR]       # pairs i with i % N == K only, each pair's numbers kept in DIR
    python benchmarks/item_bank.py --pairs 12 --results DIR --summarize   # the summary of all shards

Scene pairs, sampling and the detector are those of ``benchmarks/offline_quality.py`` (a fresh stream: seed
12345's D-Edit pairs; ``--seed 777`` is the validation stream used to choose ``--lora-lr``). Per pair:

- joint (today's image edit): target and donor finetuned together in the shared mode; the donor's object is
  put into the target's first object;
- bank: target and donor finetuned in the per-item mode (each item's adapter sees only its own pixels, so this
  equals finetuning each image alone); the donor's object is exported to a bank file and imported into the
  *shared-mode* target session of the joint run, whose training never saw the bank item's tokens or adapter,
  and put into the same object; also into the per-item target session;
- success, both ways: the detector finds the donor's colour over most of the target object's pixels and the
  largest blob of that colour there has the donor's shape; hard pixels must be identical to the original;
- recon PSNR of the target in the per-item mode and in the shared mode.

Prints ``bank edits: N/M; joint edits: K/M; recon PSNR per-item P1 dB, shared P2 dB``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_quality import SAMPLING, classify_shape, colour_share, detect   # noqa: E402  (its detector)

from dedit_nb import Editor, FinetuneConfig, Session, finetune, load_model   # noqa: E402
from dedit_nb.offline.scenes import random_scene   # noqa: E402

SHARED = dict(num_tokens=3, stage1_steps=150, stage2_steps=150, stage1_lr=5e-3, stage2_lr=5e-4, batch_size=4)


def transplanted(image: np.ndarray, region: np.ndarray, donor) -> tuple[bool, bool]:
    """(colour, colour and shape) of the donor object found in ``region``."""
    colour = colour_share(image, region, donor.colour) > 0.5
    blobs = [mask for c, _, mask in detect(image)[1] if c == donor.colour and (mask & region).any()]
    shape = bool(blobs) and classify_shape(blobs[0]) == donor.shape
    return colour, colour and shape


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-8)))


def pair_sessions(workdir: Path, i: int, mode: str, target, donor) -> list[Session]:
    sessions = []
    for name, scene in (("target", target), ("donor", donor)):
        s = Session.create(workdir / f"{i}-{mode}-{name}", scene.image, resolution=32, multiple=8)
        s.set_items(0, scene.labels, ["background"] + [o.phrase for o in scene.objects])
        sessions.append(s)
    return sessions


KEYS = ("joint", "joint colour", "bank", "bank colour", "bank, per-item receiver", "preserved", "recon per-item",
        "recon shared", "import s")


def run(model, n: int, seed: int, lora_lr: float, workdir: Path, shard: tuple[int, int] = (0, 1),
        results: Path | None = None, steps: int = 150) -> dict:
    rng = np.random.default_rng([seed, 2])       # offline_quality's D-Edit pairs
    stats = {k: [] for k in KEYS}
    settings = {**SHARED, "stage1_steps": steps, "stage2_steps": steps}
    for i in range(n):
        target, donor = random_scene(rng, num_objects=2), random_scene(rng, num_objects=1)
        if i % shard[1] != shard[0]:
            continue
        before = {k: len(v) for k, v in stats.items()}
        region = target.labels == 1
        edit = dict(**SAMPLING, seed=i, edge_thickness=2)
        shared = pair_sessions(workdir, i, "shared", target, donor)
        finetune(model, shared[0], FinetuneConfig(**settings), extra_sessions=[shared[1]], progress=False)
        per_item = pair_sessions(workdir, i, "per-item", target, donor)
        finetune(model, per_item[0], FinetuneConfig(**settings, per_item=True, lora_lr=lora_lr),
                 extra_sessions=[per_item[1]], progress=False)
        bank_file = per_item[1].export_item(0, 1, workdir / f"{i}-donor-item")

        editor = Editor(model, shared[0], progress=False, record=False)
        stats["recon shared"].append(psnr(editor.reconstruct(0, **SAMPLING, seed=i).images[0], target.image))
        joint = editor.image(0, 1, 0, 1, source_session=shared[1], **edit)
        start = time.perf_counter()
        name = shared[0].import_item(bank_file, model=model)
        stats["import s"].append(time.perf_counter() - start)
        bank = editor.run(0, [{"kind": "image", "item": 1, "source_item_file": name}], **edit)
        per_item_editor = Editor(model, per_item[0], progress=False, record=False)
        stats["recon per-item"].append(psnr(per_item_editor.reconstruct(0, **SAMPLING, seed=i).images[0],
                                            target.image))
        bank_per_item = per_item_editor.run(0, [{"kind": "image", "item": 1, "source_item_file": str(bank_file)}],
                                            **edit)
        for key, result in (("joint", joint), ("bank", bank), ("bank, per-item receiver", bank_per_item)):
            colour, both = transplanted(result.images[0], region, donor.objects[0])
            stats[key].append(both)
            if key != "bank, per-item receiver":
                stats[f"{key} colour"].append(colour)
            stats["preserved"].append(np.array_equal(result.images[0][result.regions.hard],
                                                     target.image[result.regions.hard]))
        print(f"pair {i}: joint {stats['joint'][-1]}, bank {stats['bank'][-1]} (per-item receiver "
              f"{stats['bank, per-item receiver'][-1]}), recon per-item {stats['recon per-item'][-1]:.1f} dB, "
              f"shared {stats['recon shared'][-1]:.1f} dB", flush=True)
        if results is not None:
            pair = {k: [float(x) for x in v[before[k]:]] for k, v in stats.items()}
            (results / f"pair-{i}.json").write_text(json.dumps(pair))
    return stats


def summarize(results: Path, n: int) -> dict:
    """The numbers of the pairs of ``results`` that finished (a summary says how many)."""
    stats = {k: [] for k in KEYS}
    for i in range(n):
        if not (results / f"pair-{i}.json").exists():
            print(f"pair {i} did not finish: left out")
            continue
        for k, v in json.loads((results / f"pair-{i}.json").read_text()).items():
            stats[k] += v
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--steps", type=int, default=150, help="steps of each finetune stage (both modes)")
    parser.add_argument("--lora-lr", type=float, default=5e-3, help="per-item adapters' learning rate")
    parser.add_argument("--shard", default="0/1", help="K/N: run the pairs i with i %% N == K")
    parser.add_argument("--results", type=Path, help="a folder for each pair's numbers (pair-<i>.json)")
    parser.add_argument("--summarize", action="store_true", help="print the summary of --results' pairs")
    args = parser.parse_args()
    start = time.time()
    if args.summarize:
        stats = summarize(args.results, args.pairs)
    else:
        torch.set_grad_enabled(True)
        model = load_model(args.model)
        workdir = Path(tempfile.mkdtemp(prefix="dedit-bank-"))
        if args.results is not None:
            args.results.mkdir(parents=True, exist_ok=True)
        shard = tuple(int(x) for x in args.shard.split("/"))
        try:
            stats = run(model, args.pairs, args.seed, args.lora_lr, workdir, shard, args.results, args.steps)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    m = len(stats["bank"])
    for key in ("joint colour", "bank colour", "bank, per-item receiver"):
        print(f"{key}: {sum(stats[key])}/{m}")
    print(f"hard pixels identical: {sum(stats['preserved'])}/{len(stats['preserved'])}; import "
          f"{max(stats['import s']) * 1000:.0f} ms at most; {time.time() - start:.0f} s (this process)")
    print(f"bank edits: {sum(stats['bank'])}/{m}; joint edits: {sum(stats['joint'])}/{m}; recon PSNR per-item "
          f"{np.mean(stats['recon per-item']):.1f} dB, shared {np.mean(stats['recon shared']):.1f} dB")


if __name__ == "__main__":
    main()
