"""Time to a faithful reconstruction: UNet passes (and wall time) a finetune variant needs, on the offline model.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/finetune_speed.py [--pairs 12] [--seed 12345]
        [--variants baseline,default,...] [--every 25] [--out docs/finetune-speed.json] [--report]

Every variant finetunes the same fresh scene pairs (benchmarks/offline_quality.py's target and donor scenes,
drawn from a seed stream the model never trained on; ``--seed 777`` is the stream for choices) jointly, as D-Edit's
image edit needs. Each pair's reconstruction PSNR is measured every ``--every`` steps during the one run (the
live weights, sampled as ``Editor.reconstruct`` does; the counters pause meanwhile), and at the end through the
saved weights with offline_quality's edits and detector (text, held-out word, move, remove, image: 5 per pair).

``baseline`` is the offline profile's schedule before issue 24 (200 + 200 steps, nothing of the speed-ups);
``default`` is ``FinetuneConfig.for_model("offline")`` as it is now; the others are the baseline with one
option. Passes count UNet samples inside the finetune: a training sample (forward and backward) and a
validation sample (forward only) count one each. One line per variant:
``variant NAME: passes X of Y (ratio R), recon PSNR P dB, edits S/T`` (X and P are means over the pairs; Y
is the baseline's passes), then the passes at which the mean PSNR curve first comes within 0.5 dB of the
baseline's final PSNR. Results accumulate in the JSON per pair and variant (a rerun skips what it holds);
``--report`` prints and plots them without running.
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
from offline_quality import SAMPLING, scene_pair, score_edits  # noqa: E402

from dedit_nb import FinetuneConfig, finetune, load_model  # noqa: E402
from dedit_nb import conditioning as C  # noqa: E402
from dedit_nb import masks as M  # noqa: E402
from dedit_nb.domain import psnr  # noqa: E402
from dedit_nb.sampler import SamplingConfig, masked_sample  # noqa: E402

EDITS = ("text", "text, held-out word", "move", "remove", "image")
TODAY = dict(stage1_steps=200, stage2_steps=200, stage1_lr=5e-3, stage2_lr=5e-4, batch_size=4, min_snr_gamma=0.0,
             init_tokens_from_name=False, lr_warmup_steps=0, lr_schedule="constant", stop_when="steps",
             validate_every=0)
VARIANTS = {
    "baseline": TODAY,
    "min-snr": {**TODAY, "min_snr_gamma": 5.0},
    "name-init": {**TODAY, "init_tokens_from_name": True},
    "warmup-cosine": {**TODAY, "lr_warmup_steps": 20, "lr_schedule": "cosine"},
    "plateau": {**TODAY, "stop_when": "plateau", "validate_every": 10},
    "all-but-plateau": {**TODAY, "min_snr_gamma": 5.0, "init_tokens_from_name": True, "lr_warmup_steps": 10},
    "default": {},
}


class PassCounter:
    """UNet samples run while ``active`` (a forward hook: one count per sample of each batch)."""

    def __init__(self, unet):
        self.active, self.passes, self.seconds, self.since = False, 0, 0.0, None
        self.hook = unet.register_forward_hook(self.count)

    def count(self, module, args, output):
        if self.active:
            self.passes += int(args[0].shape[0])

    def start(self):
        self.active, self.since = True, time.perf_counter()

    def pause(self):
        self.active = False
        self.seconds += time.perf_counter() - self.since


@torch.no_grad()
def live_reconstruction(model, session, seed: int) -> np.ndarray:
    """The first image regenerated from its item prompts with the weights as they are mid-finetune (what
    ``Editor.reconstruct`` samples, without loading the session's saved weights)."""
    entry = session.images[0]
    n = len(entry.items)
    cond = C.encode_items(model, [it.prompt() for it in entry.items], [C.ITEM_PROMPT_LENGTH] * n,
                          M.item_areas(entry.labels, n).astype(float).tolist(), [it.name for it in entry.items])
    everywhere = np.ones(entry.labels.shape, bool)
    regions = M.Regions(hard=~everywhere, soft=~everywhere, active=everywhere)
    return masked_sample(model, cond, C.latent_labels(model, entry.labels, n), entry.working, regions,
                         SamplingConfig(seed=seed, **SAMPLING), progress=False)[0]


def run_pair(model, variant: dict, i: int, seed: int, workdir: Path, every: int) -> dict:
    """Finetune pair ``i`` under ``variant``; its PSNR curve, passes, seconds, stops and edit results."""
    target, donor, sessions = scene_pair(np.random.default_rng([seed, 2, i]), workdir, i)
    config = FinetuneConfig.for_model(model, **variant)
    counter, curve, steps = PassCounter(model.unet), [], []

    def checkpoint(run, stage, step, callback_kwargs):
        steps.append(step)
        if (step + 1) % every == 0:
            counter.pause()
            value = psnr(target.image, live_reconstruction(model, sessions[0], i))
            curve.append([len(steps), counter.passes, value])   # steps of both stages so far
            counter.start()
        return callback_kwargs

    counter.start()
    try:
        result = finetune(model, sessions[0], config, callback=checkpoint, extra_sessions=[sessions[1]],
                          progress=False)
    finally:
        counter.pause()
        counter.hook.remove()
    stats = {k: [] for k in ("recon PSNR", *EDITS, "preserved")}
    score_edits(model, sessions, target, donor, i, stats, SAMPLING)
    return {"passes": counter.passes, "seconds": counter.seconds, "psnr": float(stats["recon PSNR"][0]),
            "edits": {k: bool(stats[k][0]) for k in EDITS}, "curve": curve, "stopped": result.stopped,
            "steps": [len(result.loss["stage1"]), len(result.loss["stage2"])]}


def mean_curve(runs: list[dict]) -> list[tuple[float, float]]:
    """Mean (passes, PSNR) over pairs at each checkpoint step; a pair that stopped earlier holds its final
    passes and PSNR from then on."""
    steps = sorted({point[0] for r in runs for point in r["curve"]})
    curve = []
    for step in steps:
        points = []
        for r in runs:
            before = [p for p in r["curve"] if p[0] <= step]
            done = not r["curve"] or step > r["curve"][-1][0]
            points.append((r["passes"], r["psnr"]) if done or not before else (before[-1][1], before[-1][2]))
        curve.append((float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points]))))
    return curve + [(float(np.mean([r["passes"] for r in runs])), float(np.mean([r["psnr"] for r in runs])))]


def report(results: dict, plot: Path | None) -> None:
    """One line per variant over the pairs the baseline ran (every variant on the same scenes), then the
    details, and over all of a variant's pairs where it ran more."""
    base = results.get("baseline")
    if not base:
        print("no baseline runs yet")
        return
    base_passes = np.mean([r["passes"] for r in base.values()])
    goal = np.mean([r["psnr"] for r in base.values()]) - 0.5
    curves = {}
    for name, by_pair in results.items():
        runs = [by_pair[k] for k in sorted(by_pair, key=int) if k in base]
        if not runs:
            continue
        passes, value = np.mean([r["passes"] for r in runs]), np.mean([r["psnr"] for r in runs])
        hits = sum(sum(r["edits"].values()) for r in runs)
        curves[name] = mean_curve(runs)
        reach = next((p for p, v in curves[name] if v >= goal), None)
        print(f"variant {name}: passes {passes:.0f} of {base_passes:.0f} (ratio {passes / base_passes:.2f}), "
              f"recon PSNR {value:.2f} dB, edits {hits}/{len(EDITS) * len(runs)}")
        plateaus = [r["stopped"].get(s, {}).get("step") for r in runs for s in ("stage1", "stage2")
                    if r["stopped"].get(s, {}).get("reason") == "plateau"]
        print(f"    pairs {', '.join(k for k in sorted(by_pair, key=int) if k in base)}; "
              f"{np.mean([r['seconds'] for r in runs]):.1f} s of finetune per pair (wall, shared cores); steps "
              f"{np.mean([r['steps'][0] for r in runs]):.0f} + {np.mean([r['steps'][1] for r in runs]):.0f}"
              f"{f', {len(plateaus)} plateau stops' if plateaus else ''}; within 0.5 dB of the baseline's "
              f"{goal + 0.5:.2f} dB at " + (f"{reach:.0f} passes (ratio {reach / base_passes:.2f})" if reach
                                           else "no checkpoint"))
        if len(by_pair) > len(runs):
            every = list(by_pair.values())
            print(f"    all its {len(every)} pairs: passes {np.mean([r['passes'] for r in every]):.0f}, recon PSNR "
                  f"{np.mean([r['psnr'] for r in every]):.2f} dB, edits "
                  f"{sum(sum(r['edits'].values()) for r in every)}/{len(EDITS) * len(every)}")
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        for name, curve in curves.items():
            ax.plot(*zip(*curve), "-", marker=".", label=name, lw=2 if name in ("baseline", "default") else 1)
        ax.axhline(goal, color="0.5", ls="--", lw=0.8, label="baseline's final PSNR - 0.5 dB")
        ax.set(xlabel="UNet passes (samples, training and validation)", ylabel="mean reconstruction PSNR (dB)",
               title="offline model: reconstruction against finetune passes")
        ax.legend(fontsize=8)
        fig.savefig(plot, dpi=110)
        print(f"curve: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--first", type=int, default=0, help="first pair index (to split a run over processes)")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--every", type=int, default=25, help="steps between PSNR checkpoints")
    parser.add_argument("--out", type=Path, default=Path("docs/finetune-speed.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/finetune-speed.png"))
    parser.add_argument("--report", action="store_true", help="print and plot the JSON's results only")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="other runs' JSON files (e.g. variants run in parallel) to add to --out first")
    args = parser.parse_args()
    results = {}
    for path in [*args.merge, args.out]:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("seed", args.seed) != args.seed:
            raise SystemExit(f"{path} holds results of --seed {saved['seed']}, not {args.seed}")
        for name, by_pair in saved.get("results", {}).items():
            results.setdefault(name, {}).update(by_pair)
    if not args.report:
        torch.set_grad_enabled(True)
        model = load_model(args.model)
        workdir = Path(tempfile.mkdtemp(prefix="dedit-speed-"))
        try:
            for i in range(args.first, args.pairs):
                for name in args.variants.split(","):
                    if str(i) in results.get(name, {}):
                        continue
                    run = run_pair(model, VARIANTS[name], i, args.seed, workdir / name, args.every)
                    results.setdefault(name, {})[str(i)] = run
                    print(f"pair {i} {name}: {run['passes']} passes, {run['seconds']:.0f} s, "
                          f"PSNR {run['psnr']:.2f}, edits {sum(run['edits'].values())}/5", flush=True)
                    save(args.out, args.seed, results)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.merge:
        save(args.out, args.seed, results)
    report(results, args.plot)


def save(path: Path, seed: int, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "results": results}, indent=1))


if __name__ == "__main__":
    main()
