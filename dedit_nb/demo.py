"""The main job on the bundled example, with the offline model: ``make demo`` runs this.

    python -m dedit_nb.demo [--output runs/demo]

It runs the notebooks headless with papermill, as a user's batch would: 01_segment on both bundled scenes,
02_finetune on them jointly, then 03_edit for reconstruct, text, move, remove and image edits, a composed
edit (a recolour and a removal in one pass) and an added item, collected with a contact sheet (each tile with
its quality figures) and an index under ``runs/demo/edits``.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from .batch import print_summary, run_batch
from .profiles import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

FINETUNE = dict(num_tokens=3, stage1_steps=150, stage2_steps=150, stage1_lr=5e-3, stage2_lr=5e-4, batch_size=4)
SAMPLING = dict(steps=25, guidance=3.0, strength=0.5, edge_thickness=2, num_images=2, seed=0)


def _item(session, colour: str) -> str:
    """The name of the item named after a colour by the offline segmenter (e.g. 'red, middle left')."""
    labels = [it.name for it in session.images[0].items]
    for label in labels:
        if label.startswith(colour):
            return label
    raise RuntimeError(f"no {colour} item among {labels}; the offline segmenter changed?")


def _title(p: dict) -> str:
    """A short title of a demo run from its 03 parameters (a composed run: its operations joined by +)."""
    if p.get("edits"):
        return " + ".join(_title({"edit": op["kind"], **op}) for op in p["edits"])
    item = str(p.get("item", "")).split(",")[0]
    detail = {"text": f"'{p.get('prompt')}'", "move": f"{item} dx={p.get('dx')} dy={p.get('dy')}",
              "remove": item, "image": "circle <- green triangle's item", "recon": "",
              "add": f"'{p.get('prompt')}' at {p.get('box')}"}.get(p["edit"], "")
    return f"{p['edit']} {detail}".strip()


def overview(results, path: Path) -> None:
    """The two bundled scenes and each edit's first image side by side, titled (the README's picture)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    tiles = [("scene_a (edited)", EXAMPLES / "scene_a.png"), ("scene_b (lends an item)", EXAMPLES / "scene_b.png")]
    for r in results:
        if r.ok and r.images:
            tiles.append((_title(r.parameters), Path(r.folder) / r.images[0]))
    fig, axes = plt.subplots(1, len(tiles), figsize=(2.2 * len(tiles), 2.6))
    for ax, (title, file) in zip(axes, tiles):
        ax.imshow(Image.open(file), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import papermill as pm
    from .session import Session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--model", default="offline")
    args = parser.parse_args(argv)
    out = args.output.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings = {}

    def notebook(name: str, target: str, **parameters) -> None:
        start = time.time()
        pm.execute_notebook(str(NOTEBOOKS / name), str(out / "notebooks" / target), parameters=parameters,
                            cwd=str(NOTEBOOKS), progress_bar=False)
        timings[target] = time.time() - start
        print(f"{target}: {timings[target]:.0f} s", flush=True)

    (out / "notebooks").mkdir()
    for scene, items in (("scene_a", 3), ("scene_b", 2)):
        notebook("01_segment.ipynb", f"01_segment_{scene}.ipynb", image_path=str(EXAMPLES / f"{scene}.png"),
                 session_dir=str(out / scene), resolution=32, multiple=8, num_items=items, interactive=False)
    notebook("02_finetune.ipynb", "02_finetune.ipynb", session_dir=str(out / "scene_a"), model=args.model,
             extra_sessions=[str(out / "scene_b")], **FINETUNE)
    a, b = Session.open(out / "scene_a"), Session.open(out / "scene_b")
    red, blue, green = _item(a, "red"), _item(a, "blue"), _item(b, "green")
    spec = {"notebook": str(NOTEBOOKS / "03_edit.ipynb"), "output": str(out / "edits"), "workers": 1,
            "parameters": {"session_dir": str(out / "scene_a"), "model": args.model, **SAMPLING},
            "runs": [{"edit": "recon"},
                     {"edit": "text", "item": red, "prompt": "a white circle"},
                     {"edit": "text", "item": blue, "prompt": "a purple square"},
                     {"edit": "move", "item": blue, "dx": -12, "dy": 10},
                     {"edit": "remove", "item": red},
                     {"edit": "image", "item": red, "source_session": str(out / "scene_b"), "source_item": green},
                     {"edits": [{"kind": "text", "item": red, "prompt": "a purple circle"},
                                {"kind": "remove", "item": blue}]},
                     {"edits": [{"kind": "add", "name": "green square", "prompt": "a green square",
                                 "box": [2, 2, 12, 12]}]}]}
    start = time.time()
    results = run_batch(spec)
    timings["edits"] = time.time() - start
    shutil.copy(out / "edits" / "contact_sheet.png", out / "contact_sheet.png")
    overview(results, out / "overview.png")
    return print_summary(results, f"edits took {timings['edits']:.0f} s; contact sheet: {out / 'contact_sheet.png'}; "
                                  f"index: {out / 'edits' / 'index.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
