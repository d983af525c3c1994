"""The notebooks in Google Colab: the setup cell each notebook starts with, and the "Open in Colab" links.

In Colab the setup cell installs this package from the repository (it cannot import it first), so its text
is written here, from :data:`REPOSITORY_URL`, and a test checks that every notebook starts with exactly this
cell. After changing the URL, ``python -m dedit_nb.colab`` rewrites the notebooks' setup cells.
"""
from __future__ import annotations

import json
from pathlib import Path

# Where the repository is published. A placeholder until it is: replace it, then run python -m dedit_nb.colab.
REPOSITORY_URL = "https://github.com/YOUR-ACCOUNT/dedit-workbench"
BRANCH = "main"
NOTEBOOKS = ("01_segment", "02_finetune", "03_edit")
SETUP_TAG = "colab-setup"


def setup_cell_source() -> str:
    """The first cell of every notebook: in Colab it installs the package and enables the custom widget
    manager (ipywidgets 8, ipycanvas), saying so in one line; anywhere else it does nothing."""
    return f'''# Setup: in Google Colab, install dedit-workbench and enable its widgets; elsewhere this cell does nothing.
import sys

if "google.colab" in sys.modules:
    import importlib
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "dedit-workbench @ git+{REPOSITORY_URL}"],
                   check=True)
    importlib.invalidate_caches()
    from google.colab import output

    output.enable_custom_widget_manager()
    print("Colab: installed dedit-workbench from {REPOSITORY_URL} and enabled the custom widget manager")'''


def colab_url(notebook: str) -> str:
    """The "Open in Colab" address of a notebook of the repository (e.g. ``"01_segment"``)."""
    path = REPOSITORY_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{notebook}.ipynb"


def setup_cell(notebook: dict) -> dict | None:
    """A notebook's setup cell (the cell tagged ``colab-setup``), or None."""
    return next((c for c in notebook["cells"] if SETUP_TAG in c.get("metadata", {}).get("tags", [])), None)


def write_setup_cells(folder: Path) -> None:
    """Put the current setup cell first in each notebook of ``folder`` (replacing an older one)."""
    for name in NOTEBOOKS:
        path = folder / f"{name}.ipynb"
        notebook = json.loads(path.read_text())
        cell = setup_cell(notebook)
        if cell is None:
            cell = {"cell_type": "code", "execution_count": None, "id": f"setup-{name[:2]}",
                    "metadata": {"tags": [SETUP_TAG]}, "outputs": []}
            notebook["cells"].insert(0, cell)
        cell["source"] = setup_cell_source().splitlines(keepends=True)
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_setup_cells(Path(__file__).resolve().parents[1] / "notebooks")
