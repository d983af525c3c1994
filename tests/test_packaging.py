"""pyproject.toml and environment.yml list the same packages (core and every extra), and make env installs
every extra; the package layering holds; the notebooks start with the Colab setup cell."""
import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def names(requirements):
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"]).union(*map(names, project["optional-dependencies"].values()))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda = [d for d in env if isinstance(d, str)]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    listed = names(conda) | names(pip)
    listed -= {"python", "pip"}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_dedit_nb_imports_no_ui():
    """dedit_nb has no UI imports; widgets depends on dedit_nb, never the reverse."""
    banned = {"ipywidgets", "ipycanvas", "widgets", "IPython"}
    for path in (ROOT / "dedit_nb").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            assert not {m.split(".")[0] for m in mods} & banned, f"{path} imports {mods}"


# the packages of dedit_nb, bottom to top: each module imports only those before it
LAYERS = {"session": ["items", "schema", "store", "checkpoints", "bank", "core"],
          "models": ["devices", "text", "adapters", "delta", "core", "loading"],
          "memory": ["allocator", "tracker", "configs", "kernels", "workload", "fit", "__main__"],
          "finetune": ["config", "schedules", "stopping", "state", "loop", "per_item", "stages"],
          "bank": ["files", "use", "__main__"]}


def dedit_nb_imports(lazy: bool) -> dict[str, set[str]]:
    """Each module of dedit_nb -> the dedit_nb modules it imports as it is loaded, and with ``lazy`` also those
    imported inside its functions; never those under ``if TYPE_CHECKING:`` (read by type checkers only)."""
    graph = {}
    for path in (ROOT / "dedit_nb").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        parts = parts[:-1] if is_package else parts
        package, name = (parts if is_package else parts[:-1]), ".".join(parts)
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) for n in ast.walk(node)
                   if (isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"))
                   or (not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))}
        graph[name] = set()
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.split(".")[0] == "dedit_nb"}
            elif node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                graph[name] |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
            elif (node.module or "").split(".")[0] == "dedit_nb":
                graph[name].add(node.module)
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def test_dedit_nb_imports_have_no_cycles():
    graph = dedit_nb_imports(lazy=False)
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for dep in sorted(graph[module]):
                visit(dep)
            path.pop()
            done.add(module)
    for module in sorted(graph):
        visit(module)


def test_only_tests_and_benchmarks_import_the_tiny_test_models():
    """dedit_nb.testing (tiny random models) is a helper of tests and benchmarks: production code never imports
    it, lazily either (what both need, such as the stand-in tokenizer, lives in the package proper)."""
    graph = dedit_nb_imports(lazy=True)
    importers = sorted(m for m, deps in graph.items() if "dedit_nb.testing" in deps)
    assert not importers, f"{importers} import dedit_nb.testing"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_package_modules_import_only_the_layers_below_them(package):
    graph, layers = dedit_nb_imports(lazy=True), LAYERS[package]
    modules = {m.rsplit(".", 1)[1] for m in graph if m.startswith(f"dedit_nb.{package}.")}
    assert modules == set(layers), f"place every module of dedit_nb.{package} in LAYERS: {modules}"
    for k, layer in enumerate(layers):
        imported = {d for d in graph[f"dedit_nb.{package}.{layer}"] if d.startswith(f"dedit_nb.{package}")}
        upward = imported - {f"dedit_nb.{package}.{below}" for below in layers[:k]}
        assert not upward, f"dedit_nb.{package}.{layer} imports {sorted(upward)}, which are not below it"

# the mask editor's modules, bottom to top: widgets/mask_editor.py composes the ones below it
MASK_EDITOR_LAYERS = ["keys", "state", "canvas_view", "mask_tools", "sam_tool", "mask_editor"]


def test_mask_editor_modules_import_only_the_layers_below_them():
    for k, layer in enumerate(MASK_EDITOR_LAYERS):
        tree = ast.parse((ROOT / "widgets" / f"{layer}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        upward = imported - set(MASK_EDITOR_LAYERS[:k])
        assert not upward, f"widgets.{layer} imports widgets.{sorted(upward)}, which are not below it"


MAX_MODULE_LINES = 450     # a module longer than this does more than one job: split it by job


def test_no_module_of_the_package_or_the_widgets_passes_the_line_limit():
    long = {str(path.relative_to(ROOT)): n for folder in ("dedit_nb", "widgets")
            for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_no_pickle_loading():
    """Untrusted files are never unpickled: every torch.load passes weights_only=True."""
    for path in list((ROOT / "dedit_nb").rglob("*.py")) + list((ROOT / "widgets").rglob("*.py")):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "allow_pickle=True" not in line, f"{path}: {line.strip()}"


def test_make_env_installs_every_extra_and_core_fits_colab():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"-e '.[{','.join(extras)}]'" in (ROOT / "Makefile").read_text()
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not names(core) & {"jupyterlab", "dask", "distributed", "playwright"}    # what Colab does not need
    torch = next(r for r in core if names([r]) == {"torch"})
    assert "==" not in torch and "<" not in torch and "~=" not in torch            # Colab's own torch stays


def test_every_notebook_starts_with_the_colab_setup_cell():
    import json

    from dedit_nb.colab import NOTEBOOKS, REPOSITORY_URL, colab_url, setup_cell_source
    readme = (ROOT / "README.md").read_text()
    assert setup_cell_source() in readme and all(colab_url(name) in readme for name in NOTEBOOKS)
    for name in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        assert "".join(cells[0]["source"]) == setup_cell_source(), f"{name}: run python -m dedit_nb.colab"
        assert sum("google.colab" in "".join(c["source"]) for c in cells) == 1
        assert cells[0]["outputs"] == []
    assert f"git+{REPOSITORY_URL}" in setup_cell_source()


def test_the_setup_cell_does_nothing_outside_colab_and_installs_inside(monkeypatch, capsys):
    import subprocess
    import sys
    import types

    from dedit_nb.colab import REPOSITORY_URL, setup_cell_source
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a[0]))
    exec(setup_cell_source(), {})
    assert calls == [] and capsys.readouterr().out == ""                          # not Colab: nothing
    enabled = []
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: enabled.append(True))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    exec(setup_cell_source(), {})
    assert len(calls) == 1 and f"dedit-workbench @ git+{REPOSITORY_URL}" in calls[0] and enabled == [True]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "installed dedit-workbench" in said[0] and "widget manager" in said[0]


def test_no_tracked_file_names_a_build_machines_paths():
    """Tracked files carry no absolute path of the machine they were written on (a checkout's, a home's or a
    scratch folder's): commands in docs and logs are relative to the repository."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout.decode()
    machine_path = re.compile(r"(?<![\w.~-])/(?:work|root|home/\w+)/")
    found = []
    for name in filter(None, names.split("\0")):
        path = root / name
        if not path.is_file() or path.suffix in {".png", ".jpg", ".safetensors", ".npy", ".pth"}:
            continue
        text = path.read_text(errors="ignore")
        found += [f"{name}: {m.group(0)}" for m in machine_path.finditer(text)]
    assert not found, found
