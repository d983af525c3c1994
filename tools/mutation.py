"""Mutation testing over the core modules: one-line behaviour changes applied one at a time to a copy.

    python tools/mutation.py                       # every mutant of tools/mutants.yaml, core fast tests
    python tools/mutation.py --only sampler-zero-item-map attention-mask-inverted
    python tools/mutation.py --tests tests/test_sampler.py -k "not before_the_rewrite" --json runs/mutation.json

The repository's files (tracked plus untracked, not ignored) are copied to a temporary folder once per worker;
each mutant replaces its ``original`` snippet (which must occur exactly once) by its ``replacement``, the fast
tests (the mutant's own ``tests`` list when it has one) run there with ``-x`` (the first failure kills the
mutant), and the file is restored. The unmutated copy must pass first. A mutant is *killed* when the tests fail (or time out, or no longer import), *survived* when
they pass, and *not found* when its snippet no longer occurs (the code was changed: update the list). The
score is killed / (killed + survived).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = ["tests/test_masks.py", "tests/test_attention.py", "tests/test_sampler.py", "tests/test_wiring.py",
              "tests/test_finetune.py", "tests/test_precision.py", "tests/test_prompts.py", "tests/test_sizes.py",
              "tests/test_edits.py", "tests/test_offline.py", "tests/test_denoiser.py"]


def load_mutants(path: Path) -> list[dict]:
    mutants = yaml.safe_load(path.read_text())
    for m in mutants:
        missing = {"id", "file", "original", "replacement"} - set(m)
        if missing:
            raise SystemExit(f"{path}: mutant {m.get('id', m)} lacks {sorted(missing)}")
    ids = [m["id"] for m in mutants]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: mutant ids repeat")
    return mutants


def copy_repository(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: list[str], timeout: float, keyword: str | None = None) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    if keyword:
        cmd += ["-k", keyword]
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    lines = [l for l in done.stdout.splitlines() if l.strip()]
    failed = next((l for l in lines if l.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    return done.returncode, failed


def apply(copy: Path, mutant: dict) -> str | None:
    """Mutate the file in ``copy``; returns its original text, or None when the snippet does not occur once."""
    path = copy / mutant["file"]
    if not path.exists():
        return None
    text = path.read_text()
    if text.count(mutant["original"]) != 1:
        return None
    path.write_text(text.replace(mutant["original"], mutant["replacement"]))
    return text


def run_mutant(copy: Path, mutant: dict, tests: list[str], timeout: float, keyword: str | None = None) -> dict:
    path = copy / mutant["file"]
    text = path.read_text() if path.exists() else ""
    count = text.count(mutant["original"])
    if count != 1:
        return {"id": mutant["id"], "status": "not found" if count == 0 else f"ambiguous ({count} matches)",
                "detail": mutant["file"], "seconds": 0.0}
    start = time.perf_counter()
    original = apply(copy, mutant)
    try:
        rc, detail = run_tests(copy, mutant.get("tests") or tests, timeout, keyword)
    finally:
        path.write_text(original)
    status = "survived" if rc == 0 else "killed"
    if rc is None:
        detail = "timed out"
    elif rc not in (0, 1):
        detail = f"pytest exit {rc}: {detail}"
    return {"id": mutant["id"], "status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=Path, default=ROOT / "tools" / "mutants.yaml")
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--tests", nargs="*", help=f"test files (default: those of {CORE_TESTS} that exist)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (e.g. to see which other test kills)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel, each in its own copy")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a timeout kills)")
    parser.add_argument("--json", type=Path, help="write the results here as well")
    args = parser.parse_args(argv)

    mutants = load_mutants(args.mutants)
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m["id"] in args.only]
    tests = args.tests or [t for t in CORE_TESTS if (ROOT / t).exists()]
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copies = [Path(tmp) / f"copy{j}" for j in range(max(1, args.jobs))]
        for copy in copies:
            copy.mkdir()
            copy_repository(copy)
        rc, detail = run_tests(copies[0], tests, args.timeout, args.keyword)
        if rc != 0:
            raise SystemExit(f"the unmutated tests do not pass ({detail}); fix them before mutation testing")
        print(f"{len(mutants)} mutants, tests: {' '.join(tests)}", flush=True)
        free = list(copies)

        def work(mutant):
            copy = free.pop()
            try:
                result = run_mutant(copy, mutant, tests, args.timeout, args.keyword)
            finally:
                free.append(copy)
            print(f"{result['status']:>9}  {result['id']:<40} {result['seconds']:>6}s  {result['detail']}", flush=True)
            return result

        with ThreadPoolExecutor(len(copies)) as pool:
            results = list(pool.map(work, mutants))
    killed = sum(r["status"] == "killed" for r in results)
    survived = [r["id"] for r in results if r["status"] == "survived"]
    missing = [r["id"] for r in results if r["status"] not in ("killed", "survived")]
    tested = killed + len(survived)
    score = killed / tested if tested else 0.0
    print(f"\nkilled {killed} / {tested} ({score:.0%}); survived: {', '.join(survived) or 'none'}")
    if missing:
        print(f"not run, snippet not found or ambiguous: {', '.join(missing)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"score": score, "killed": killed, "tested": tested, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
