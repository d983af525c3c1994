"""Batch regeneration: run a notebook over a grid of parameter sets with papermill.

    python -m dedit_nb.batch GRID.yaml

A grid file::

    notebook: notebooks/03_edit.ipynb      # relative to the grid file
    output: runs/batch                     # relative to the grid file
    workers: 1                             # local runs at a time (default: one per GPU, else 1)
    dask_scheduler: null                   # a dask.distributed scheduler address sends runs there instead
    parameters: {session_dir: runs/session_a, edit: text, item: 1}   # shared by every run
    grid: {prompt: [a green circle, a white circle], seed: [0, 1]}    # every combination
    runs: [{edit: remove}]                 # extra parameter sets, each merged over `parameters`

Each run gets its own folder ``run-NNN`` with the executed notebook and its outputs (``output_dir`` is set
to that folder). A failing run is recorded with the failing cell and error, and the batch goes on. At the
end: ``report.json``, ``index.md``, ``index.html`` and ``contact_sheet.png``.
"""
from __future__ import annotations

import argparse
import html
import itertools
import json
import re
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import yaml
from PIL import Image, ImageDraw

from .notebook import NOTEBOOK_PARAMETERS
from .session import atomic_write_bytes, png_bytes


@dataclass
class RunResult:
    name: str
    parameters: dict
    ok: bool
    folder: str
    images: list[str] = field(default_factory=list)
    error: str | None = None
    failed_cell: int | None = None
    seconds: float = 0.0


def expand(spec: dict) -> list[dict]:
    """The parameter sets of a grid spec: `parameters` merged with each grid combination, then `runs`."""
    base = dict(spec.get("parameters") or {})
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError("'grid' maps a parameter name to a list of values")
    keys = list(grid)
    sets = [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))] if keys else []
    for extra in spec.get("runs") or []:
        sets.append({**base, **extra})
    if not sets:
        sets = [base]
    return sets


def default_workers() -> int:
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def run_one(notebook: str, folder: str, parameters: dict, kernel_name: str | None = None, cwd: str | None = None
            ) -> RunResult:
    """Execute one parameter set (papermill) into ``folder``; never raises for a failing notebook."""
    import papermill as pm
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    params = {**parameters, **_run_settings(notebook, out)}
    start = time.time()
    result = RunResult(out.name, parameters, True, str(out))
    try:
        pm.execute_notebook(notebook, str(out / "notebook.ipynb"), parameters=params, kernel_name=kernel_name,
                            cwd=cwd, progress_bar=False, log_output=False)
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        result.ok = False
        result.error = _short_error(exc)
        result.failed_cell = getattr(exc, "exec_count", None)
    result.seconds = round(time.time() - start, 1)
    result.images = _written_images(out) if result.ok else []
    atomic_write_bytes(out / "run.json", json.dumps(asdict(result), indent=2, default=str).encode())
    return result


def _run_settings(notebook: str, out: Path) -> dict:
    """What every run of the batch sets: its own folder (replaced on a rerun of the grid), headless. Only the
    names the notebook has, so 01 and 02 pass their check cells too (they have no ``output_dir``)."""
    settings = {"output_dir": str(out), "interactive": False, "overwrite": True}
    known = NOTEBOOK_PARAMETERS.get(Path(notebook).stem)
    return settings if known is None else {k: v for k, v in settings.items() if k in known}


def _written_images(out: Path) -> list[str]:
    """The images this run's edit wrote (its manifest lists them; a rerun's leftovers do not count)."""
    try:
        return list(json.loads((out / "manifest.json").read_text())["files"]["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _short_error(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def output_folder(spec: dict, base_dir: Path = Path(".")) -> Path:
    """Where a grid spec's runs and report go (``output`` is relative to the grid file's folder)."""
    return (Path(base_dir) / spec.get("output", "runs/batch")).resolve()


def run_batch(spec: dict, base_dir: Path = Path("."), workers: int | None = None, scheduler: str | None = None,
              kernel_name: str | None = None) -> list[RunResult]:
    """Run every parameter set of a grid spec; returns the results (also written as the report)."""
    if "scheduler" in spec:
        raise ValueError("a grid file's top-level 'scheduler' is ambiguous: write the Dask cluster's address as "
                         "'dask_scheduler', and a sampler (ddim, dpm++, euler...) under 'parameters' or 'grid'")
    notebook = (base_dir / spec["notebook"]).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"notebook {notebook} does not exist (paths in a grid file are relative to it)")
    output = output_folder(spec, base_dir)
    output.mkdir(parents=True, exist_ok=True)
    sets = expand(spec)
    jobs = [(str(notebook), str(output / f"run-{i:03d}"), params) for i, params in enumerate(sets)]
    cwd = str(notebook.parent)
    scheduler = scheduler or spec.get("dask_scheduler")
    if scheduler:
        from dask.distributed import Client
        with Client(scheduler) as client:
            futures = [client.submit(run_one, nb, folder, params, kernel_name, cwd, pure=False)
                       for nb, folder, params in jobs]
            results = client.gather(futures)
    else:
        n = workers or spec.get("workers") or default_workers()
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(lambda job: run_one(*job, kernel_name, cwd), jobs))
    write_report(results, output)
    return results


def write_report(results: list[RunResult], output: Path) -> None:
    """report.json, index.md, index.html and contact_sheet.png for a finished batch."""
    output = Path(output)
    ok = sum(r.ok for r in results)
    atomic_write_bytes(output / "report.json", json.dumps(
        {"runs": [asdict(r) for r in results], "ok": ok, "failed": len(results) - ok}, indent=2, default=str).encode())
    varying = sorted({k for r in results for k in r.parameters
                      if len({json.dumps(x.parameters.get(k), default=str) for x in results}) > 1})
    lines = [f"# Batch: {ok} of {len(results)} runs succeeded", "",
             "![contact sheet](contact_sheet.png)", "",
             "| run | " + " | ".join(md_escape(k) for k in varying) + " | status | images |",
             "|---|" + "---|" * len(varying) + "---|---|"]
    rows_html = []
    for r in results:
        status = "ok" if r.ok else f"FAILED (cell {r.failed_cell}): {r.error}"
        name, link = md_escape(r.name), quote(f"{r.name}/notebook.ipynb")
        images = " ".join(f"![]({quote(f'{r.name}/{img}')})" for img in r.images)
        lines.append(f"| [{name}]({link}) | " + " | ".join(md_escape(r.parameters.get(k)) for k in varying)
                     + f" | {md_escape(status)} | {images} |")
        imgs = "".join(f"<img src='{html.escape(quote(f'{r.name}/{img}'))}' width='96' "
                       "style='image-rendering:pixelated'>" for img in r.images)
        rows_html.append(f"<tr><td><a href='{html.escape(link)}'>{html.escape(r.name)}</a></td>" +
                         "".join(f"<td>{html.escape(str(r.parameters.get(k)))}</td>" for k in varying) +
                         f"<td style='color:{'green' if r.ok else '#b00'}'>{html.escape(status)}</td>"
                         f"<td>{imgs}</td></tr>")
    atomic_write_bytes(output / "index.md", ("\n".join(lines) + "\n").encode())
    head = "".join(f"<th>{html.escape(k)}</th>" for k in varying)
    atomic_write_bytes(output / "index.html", (
        f"<html><body><h1>Batch: {ok} of {len(results)} runs succeeded</h1><img src='contact_sheet.png'>"
        f"<table border='1' cellpadding='4'><tr><th>run</th>{head}<th>status</th><th>images</th></tr>"
        + "".join(rows_html) + "</table></body></html>").encode())
    contact_sheet(results, varying, output / "contact_sheet.png")


def md_escape(value) -> str:
    """A value as literal text in a Markdown table cell: HTML escaped (Markdown passes HTML through),
    Markdown's punctuation backslash-escaped, on one line."""
    text = html.escape(" ".join(str(value).split()))
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)


def contact_sheet(results: list[RunResult], varying: list[str], path: Path, tile: int = 160) -> None:
    """One tile per run (its first image, scaled up without blurring small images), captioned with the
    parameters that vary; failed runs are red tiles with the error."""
    cols = min(4, max(1, len(results)))
    rows = (len(results) + cols - 1) // cols
    caption_h = 14 * max(2, len(varying) + 1)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(results):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        if r.ok and r.images:
            img = Image.open(Path(r.folder) / r.images[0]).convert("RGB")
            scale = tile / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.NEAREST if max(img.size) < tile else Image.LANCZOS)
            sheet.paste(img, (x, y))
        else:
            draw.rectangle([x + 2, y + 2, x + tile - 3, y + tile - 3], fill=(250, 220, 220), outline=(180, 0, 0))
            draw.text((x + 6, y + 6), "FAILED", fill=(180, 0, 0))
            for j, chunk in enumerate(_wrap(r.error or "", 26)[:8]):
                draw.text((x + 6, y + 24 + 12 * j), chunk, fill=(90, 0, 0))
        captions = [r.name] + [f"{k}={r.parameters[k]}" for k in varying if r.parameters.get(k) is not None]
        for j, text in enumerate(captions):
            draw.text((x + 4, y + tile + 2 + 14 * j), text[:28], fill="black")
    atomic_write_bytes(path, png_bytes(np.asarray(sheet)))


def _wrap(text: str, width: int) -> list[str]:
    return [text[i:i + width] for i in range(0, len(text), width)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a notebook over a grid of parameters with papermill")
    parser.add_argument("grid", type=Path, help="the grid YAML file")
    parser.add_argument("--workers", type=int, default=None, help="local runs at a time")
    parser.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(args.grid.read_text())
    if not isinstance(spec, dict) or "notebook" not in spec:
        parser.error(f"{args.grid} must be a mapping with at least 'notebook'")
    results = run_batch(spec, args.grid.parent, args.workers, args.scheduler, args.kernel)
    return print_summary(results, f"report: {output_folder(spec, args.grid.parent) / 'index.md'}")


def print_summary(results: list[RunResult], where: str) -> int:
    """Print how many runs succeeded, where to look, and each failure; returns the exit status."""
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} runs succeeded; {where}")
    for r in failed:
        print(f"  {r.name} failed at cell {r.failed_cell}: {r.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
