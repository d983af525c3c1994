"""What the quality record in every edit manifest costs, as a share of the edit's own time, at 512x512.

    python benchmarks/quality_overhead.py [--model tiny-sd] [--size 512] [--steps 50] [--repeats 3] [--clock cpu]

A session of the astronaut photo (512x512) at ``--size`` (three items), finetuned for one step a stage, then
text edits with ``--steps`` sampling steps (the Stable Diffusion profile's default: 50). The edit's time is the
median of ``--repeats`` runs of ``Editor.text`` (which computes the record too); the record's time is the median
of ``quality_record`` on that edit's arrays: the D-Edit case (every preserved pixel identical, SSIM known without
filtering), and the general case (every preserved pixel changed, as an editor without the pixel composite
leaves them: SSIM filtered over them). ``--model``: ``tiny-sd`` (a random tiny Stable Diffusion; its UNet is far
cheaper than a real one, so its ratio is an upper bound), ``offline`` or a model folder. Goal: <= 3%.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from skimage import data

from dedit_nb import Editor, FinetuneConfig, Session, finetune, load_model
from dedit_nb.testing import build_tiny_model
from dedit_nb.quality import quality_record


def median_seconds(run, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (a fair ratio on a machine other jobs share)")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model("sd", Path(tmp) / "tiny-sd") if args.model == "tiny-sd" else args.model
        model = load_model(str(folder))
        session = Session.create(Path(tmp) / "session", data.astronaut(), resolution=args.size,
                                 multiple=model.latent_factor * 2)
        h, w = session.images[0].labels.shape
        labels = session.images[0].labels.copy()
        labels[:, w // 2:] = 1
        labels[: h // 3] = 2
        session.set_items(0, labels, ["left", "right", "top"])
        finetune(model, session, FinetuneConfig(num_tokens=2, stage1_steps=1, stage2_steps=1), progress=False)
        print(f"{args.model} at {w}x{h}: finetuned; timing edits", flush=True)
        editor = Editor(model, session, progress=False, record=False)
        result = editor.text(0, "left", "a red bag", steps=args.steps)
        edit = median_seconds(lambda: editor.text(0, "left", "a red bag", steps=args.steps), args.repeats, clock)
    original, edited, regions = result.original, result.images[0], result.regions
    exact = median_seconds(lambda: quality_record(original, edited, regions), 5, clock)
    changed = edited.copy()
    changed[regions.hard] ^= 1                       # every preserved pixel one level off
    general = median_seconds(lambda: quality_record(original, changed, regions), 5, clock)
    print(f"{args.model}, {w}x{h}, {args.steps} steps, {args.clock} time: one text edit {edit:.2f} s (median of "
          f"{args.repeats}, record included); quality record {exact * 1000:.0f} ms = {exact / edit:.1%} of the edit "
          f"(preserved pixels identical, as D-Edit leaves them); {general * 1000:.0f} ms = {general / edit:.1%} "
          f"with every preserved pixel changed (SSIM filtered). Goal <= 3%.")


if __name__ == "__main__":
    main()
