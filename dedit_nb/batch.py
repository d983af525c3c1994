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
    # 03's `edits` varies like any parameter: runs: [{edits: [{kind: remove, item: 1}, {kind: add, ...}]}]

Each run gets its own folder ``run-NNN`` with the executed notebook and its outputs (``output_dir`` is set
to that folder). A failing run is recorded with the failing cell and error, and the batch goes on. At the
end: ``report.json``, ``index.md``, ``index.html`` and ``contact_sheet.png``. An ``output`` folder that holds
files but no report of ours is never written into: the batch goes to the next numbered folder.

A grid file is data, never code: it is read with ``yaml.safe_load`` and refused when aliases expand it past
:data:`MAX_GRID_VALUES` values; every parameter name must be one of the notebook's parameters and every value
plain data (text, numbers, booleans, null, lists and mappings of them), checked by the notebook's parameter
schemas (:data:`notebook.NOTEBOOK_PARAMETERS`; each operation of ``edits`` by its kind's), all before any run starts (papermill
writes parameters into the notebook as Python). More than :data:`CONFIRM_RUNS` runs need ``--yes``; more than
:data:`MAX_RUNS` are refused.
"""
from __future__ import annotations

import argparse
import html
import itertools
import json
import keyword
import math
import re
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import yaml
from PIL import Image, ImageDraw

from .notebook import NOTEBOOK_PARAMETERS, ParameterError, check_values
from .operations import operations_from
from .quality import quality_summary
from .reruns import BATCH_MARKER, choose_folder
from .session import atomic_write_bytes, png_bytes

CONFIRM_RUNS = 100           # a grid of more runs than this starts only when confirmed (--yes)
MAX_RUNS = 100_000           # and one of more is refused
MAX_GRID_VALUES = 100_000    # values in a grid file once its aliases are expanded ("billion laughs")
CONTACT_SHEET_TILES = 400    # runs shown on the contact sheet (the index lists every run)
# the quality figures (quality_summary's titles) under each tile; the index has them all
CONTACT_SHEET_FIGURES = ("preserved px changed", "PSNR preserved (dB)", "seam")
BITMAP_FONT_TEXT = str.maketrans({"∞": "inf", "–": "-"})     # PIL's default font has no glyph for these


class GridError(ValueError):
    """A grid file that cannot run, with the fix."""


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
    quality: dict | None = None     # the quality record of the run's first image (its manifest's)


def load_grid(path: str | Path) -> dict:
    """A grid file, read as data and checked for its shape (see the module's notes)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"{path} is not valid YAML ({exc})") from exc
    try:
        values = _expanded_size(spec, {}, set())
    except RecursionError:
        values = MAX_GRID_VALUES + 1
    if values > MAX_GRID_VALUES:
        raise GridError(f"{path} holds more than {MAX_GRID_VALUES} values once its aliases (*name) are expanded; "
                        "write the values out, or split the grid")
    if not isinstance(spec, dict) or not isinstance(spec.get("notebook"), str):
        raise GridError(f"{path} must be a mapping with at least 'notebook' (the notebook's path)")
    return spec


def _expanded_size(value, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``value`` holds with every alias written out (computed once per shared object)."""
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key in open_:
        raise GridError("the grid file holds a list or mapping that contains itself (through an alias)")
    if key not in sizes:
        open_.add(key)
        total = 1
        for child in (value.values() if isinstance(value, dict) else value):
            total += _expanded_size(child, sizes, open_)
            if total > MAX_GRID_VALUES:
                break
        open_.discard(key)
        sizes[key] = total
    return sizes[key]


def expand(spec: dict, notebook: str | None = None) -> list[dict]:
    """The parameter sets of a grid spec: `parameters` merged with each grid combination, then `runs`; each
    checked (:func:`check_run`) against ``notebook``'s parameters (by its stem, e.g. ``03_edit``)."""
    base = spec.get("parameters") or {}
    grid = spec.get("grid") or {}
    runs = spec.get("runs") or []
    if not isinstance(base, dict):
        raise GridError(f"'parameters' maps a parameter name to one value, got {base!r}")
    if not isinstance(grid, dict):
        raise GridError("'grid' maps a parameter name to a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"grid: {key} should be a list of values, e.g. {key}: [{values!r}] (a value every run "
                            f"shares goes under 'parameters'), got {values!r}")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise GridError(f"'runs' is a list of parameter mappings, e.g. runs: [{{edit: remove}}], got {runs!r}")
    count = (math.prod(len(v) for v in grid.values()) if grid else 0) + len(runs)
    if count > MAX_RUNS:
        raise GridError(f"the grid makes {count} runs, more than {MAX_RUNS}; split it")
    keys = list(grid)
    sets = [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))] if keys else []
    sets += [{**base, **extra} for extra in runs]
    sets = sets or [dict(base)]
    for i, params in enumerate(sets):
        check_run(notebook, params, f"run {i}")
    return sets


def check_run(notebook: str | None, parameters: dict, where: str = "the run") -> None:
    """Refuse a parameter set papermill must not inject: a name that is not one of the notebook's parameters
    (papermill writes ``name = value`` lines), a value that is not plain data, a value of the wrong type, or
    a grid run that would start a grid itself."""
    known = NOTEBOOK_PARAMETERS.get(notebook) if notebook else None
    for name, value in parameters.items():
        if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
            raise GridError(f"{where}: {name!r} is not a parameter name")
        if not _plain_data(value):
            raise GridError(f"{where}: parameter {name!r} is {value!r}, not text, a number, true/false, null or a "
                            "list or mapping of them")
    if parameters.get("batch_grid") is not None:
        raise GridError(f"{where} sets batch_grid: a run of a grid cannot run a grid itself; remove batch_grid from "
                        "the grid file")
    if known is not None:
        try:
            check_values(known, parameters)
            if parameters.get("edits") and "edits" in known:
                operations_from(parameters["edits"])      # each operation by its kind's schema
        except ParameterError as exc:
            raise GridError(f"{where}: {exc} ({notebook})") from exc


def _plain_data(value) -> bool:
    if isinstance(value, list):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return value is None or isinstance(value, (str, bool, int, float))


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
    check_run(Path(notebook).stem, parameters)
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
    result.quality = _first_quality(out) if result.ok else None
    atomic_write_bytes(out / "run.json", json.dumps(asdict(result), indent=2, default=str).encode())
    return result


def _run_settings(notebook: str, out: Path) -> dict:
    """What every run of the batch sets: its own folder (replaced on a rerun of the grid), headless. Only the
    names the notebook has, so 01 and 02 pass their check cells too (they have no ``output_dir``)."""
    settings = {"output_dir": str(out), "interactive": False, "overwrite": True, "batch_grid": None}
    known = NOTEBOOK_PARAMETERS.get(Path(notebook).stem)
    return settings if known is None else {k: v for k, v in settings.items() if k in known}


def _written_images(out: Path) -> list[str]:
    """The images this run's edit wrote (its manifest lists them; a rerun's leftovers do not count)."""
    try:
        return list(json.loads((out / "manifest.json").read_text())["files"]["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _first_quality(out: Path) -> dict | None:
    """The quality record of the first image this run's edit wrote (None without one)."""
    try:
        record = json.loads((out / "manifest.json").read_text())["quality"][0]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return record if isinstance(record, dict) else None


def _short_error(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def output_folder(spec: dict, base_dir: Path = Path(".")) -> Path:
    """Where a grid spec's runs and report go (``output`` is relative to the grid file's folder)."""
    return (Path(base_dir) / spec.get("output", "runs/batch")).resolve()


def batch_output(spec: dict, base_dir: Path = Path(".")) -> tuple[Path, str | None]:
    """Where a batch writes: its ``output`` folder when that is new, empty or an earlier batch's (replaced);
    else the next numbered folder, with a one-line note saying so."""
    return choose_folder(output_folder(spec, base_dir), overwrite=True, marker=BATCH_MARKER, what="a batch")


def run_batch(spec: dict, base_dir: Path = Path("."), workers: int | None = None, dask_scheduler: str | None = None,
              kernel_name: str | None = None, yes: bool = False, output: Path | None = None) -> list[RunResult]:
    """Run every parameter set of a grid spec into ``output`` (default: :func:`batch_output`, its note given as
    a warning); returns the results (also written as the report). More than :data:`CONFIRM_RUNS` runs need
    ``yes=True``. ``dask_scheduler`` (else the spec's) is a Dask cluster's address: the runs go there."""
    if "scheduler" in spec:
        raise ValueError("a grid file's top-level 'scheduler' is ambiguous: write the Dask cluster's address as "
                         "'dask_scheduler', and a sampler (ddim, dpm++, euler...) under 'parameters' or 'grid'")
    notebook = (base_dir / spec["notebook"]).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"notebook {notebook} does not exist (paths in a grid file are relative to it)")
    sets = expand(spec, notebook.stem)
    if len(sets) > CONFIRM_RUNS and not yes:
        raise GridError(f"the grid makes {len(sets)} runs (more than {CONFIRM_RUNS}); pass --yes "
                        "(run_batch(..., yes=True)) to run them all")
    if output is None:
        output, note = batch_output(spec, base_dir)
        if note:
            warnings.warn(note, stacklevel=2)
    output.mkdir(parents=True, exist_ok=True)
    jobs = [(str(notebook), str(output / f"run-{i:03d}"), params) for i, params in enumerate(sets)]
    cwd = str(notebook.parent)
    dask_scheduler = dask_scheduler or spec.get("dask_scheduler")
    if dask_scheduler:
        from dask.distributed import Client
        with Client(dask_scheduler) as client:
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
    keys = sorted({k for r in results for k in r.parameters})
    varying = [k for k in keys if len({json.dumps(r.parameters.get(k), default=str) for r in results}) > 1]
    summaries = [quality_summary(r.quality) for r in results]
    figures = list(dict.fromkeys(k for summary in summaries for k in summary))     # quality columns, in order
    lines = [f"# Batch: {ok} of {len(results)} runs succeeded", "",
             "![contact sheet](contact_sheet.png)", ""]
    if len(results) > CONTACT_SHEET_TILES:
        lines += [f"The contact sheet shows the first {CONTACT_SHEET_TILES} runs; the table lists all.", ""]
    lines += [
             "| run | " + " | ".join(md_escape(k) for k in varying + figures) + " | status | images |",
             "|---|" + "---|" * len(varying + figures) + "---|---|"]
    rows_html = []
    for r, summary in zip(results, summaries):
        status = "ok" if r.ok else f"FAILED (cell {r.failed_cell}): {r.error}"
        name, link = md_escape(r.name), quote(f"{r.name}/notebook.ipynb")
        images = " ".join(f"![]({quote(f'{r.name}/{img}')})" for img in r.images)
        lines.append(f"| [{name}]({link}) | " + " | ".join([md_escape(r.parameters.get(k)) for k in varying]
                                                           + [md_escape(summary.get(k, "")) for k in figures])
                     + f" | {md_escape(status)} | {images} |")
        imgs = "".join(f"<img src='{html.escape(quote(f'{r.name}/{img}'))}' width='96' "
                       "style='image-rendering:pixelated'>" for img in r.images)
        rows_html.append(f"<tr><td><a href='{html.escape(link)}'>{html.escape(r.name)}</a></td>" +
                         "".join(f"<td>{html.escape(str(r.parameters.get(k)))}</td>" for k in varying) +
                         "".join(f"<td>{html.escape(summary.get(k, ''))}</td>" for k in figures) +
                         f"<td style='color:{'green' if r.ok else '#b00'}'>{html.escape(status)}</td>"
                         f"<td>{imgs}</td></tr>")
    atomic_write_bytes(output / "index.md", ("\n".join(lines) + "\n").encode())
    head = "".join(f"<th>{html.escape(k)}</th>" for k in varying + figures)
    atomic_write_bytes(output / "index.html", (
        f"<html><body><h1>Batch: {ok} of {len(results)} runs succeeded</h1><img src='contact_sheet.png'>"
        f"<table border='1' cellpadding='4'><tr><th>run</th>{head}<th>status</th><th>images</th></tr>"
        + "".join(rows_html) + "</table></body></html>").encode())
    contact_sheet(results[:CONTACT_SHEET_TILES], varying, output / "contact_sheet.png")


def md_escape(value) -> str:
    """A value as literal text in a Markdown table cell: HTML escaped (Markdown passes HTML through),
    Markdown's punctuation backslash-escaped, on one line."""
    text = html.escape(" ".join(str(value).split()))
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)


def contact_sheet(results: list[RunResult], varying: list[str], path: Path, tile: int = 160) -> None:
    """One tile per run (its first image, scaled up without blurring small images), captioned with the
    parameters that vary and the main quality figures (:data:`CONTACT_SHEET_FIGURES`); failed runs are red
    tiles with the error."""
    cols = min(4, max(1, len(results)))
    rows = (len(results) + cols - 1) // cols
    figures = [[f"{k}: {summary[k]}".translate(BITMAP_FONT_TEXT) for k in CONTACT_SHEET_FIGURES if k in summary]
               for summary in map(quality_summary, (r.quality for r in results))]
    caption_h = 14 * max(2, len(varying) + 1 + max(map(len, figures), default=0))
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
        captions += figures[i]
        for j, text in enumerate(captions):
            draw.text((x + 4, y + tile + 2 + 14 * j), text[:28], fill="black")
    atomic_write_bytes(path, png_bytes(np.asarray(sheet)))


def _wrap(text: str, width: int) -> list[str]:
    return [text[i:i + width] for i in range(0, len(text), width)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a notebook over a grid of parameters with papermill")
    parser.add_argument("grid", type=Path, help="the grid YAML file")
    parser.add_argument("--workers", type=int, default=None, help="local runs at a time")
    parser.add_argument("--dask-scheduler", default=None, help="a dask.distributed cluster's scheduler address")
    parser.add_argument("--scheduler", help=argparse.SUPPRESS)   # the sampler's name elsewhere: refused below
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--yes", action="store_true", help=f"run a grid of more than {CONFIRM_RUNS} runs")
    args = parser.parse_args(argv)
    if args.scheduler is not None:
        parser.error("--scheduler is ambiguous: a Dask cluster's address is --dask-scheduler (a sampler is the "
                     "grid's 'scheduler' parameter)")
    try:
        spec = load_grid(args.grid)
        count = len(expand(spec, Path(spec["notebook"]).stem))
        if count > CONFIRM_RUNS and not args.yes:
            raise GridError(f"{args.grid} makes {count} runs (more than {CONFIRM_RUNS}); pass --yes to run them all")
    except (GridError, OSError) as exc:
        parser.error(str(exc))
    output, note = batch_output(spec, args.grid.parent)
    print(f"{count} runs" + (f"; {note}" if note else ""))
    results = run_batch(spec, args.grid.parent, args.workers, args.dask_scheduler, args.kernel, yes=True, output=output)
    return print_summary(results, f"report: {output / 'index.md'}")


def print_summary(results: list[RunResult], where: str) -> int:
    """Print how many runs succeeded, where to look, and each failure; returns the exit status."""
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} runs succeeded; {where}")
    for r in failed:
        print(f"  {r.name} failed at cell {r.failed_cell}: {r.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
