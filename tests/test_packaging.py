"""pyproject.toml and environment.yml list the same packages; the package layering holds."""
import ast
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def names(requirements):
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"]) | names(project["optional-dependencies"]["dev"])
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


def test_no_pickle_loading():
    """Untrusted files are never unpickled: every torch.load passes weights_only=True."""
    for path in list((ROOT / "dedit_nb").rglob("*.py")) + list((ROOT / "widgets").rglob("*.py")):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "allow_pickle=True" not in line, f"{path}: {line.strip()}"
