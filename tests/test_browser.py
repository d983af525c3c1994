"""End to end in a real browser: JupyterLab on a free localhost port, Debian's headless Chromium driven by
Playwright, a notebook that shows the editor, a brush stroke drawn with the mouse, checked from the kernel.

Set DEDIT_SCREENSHOT=path to also save a screenshot of the editor and palette (used for the README).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from skimage import data

from dedit_nb.segment import segment_session
from dedit_nb.session import Session

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notebook(cells):
    return {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                       "source": src} for src in cells],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def jupyter(tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    port, token = free_port(), "dedit-test-token"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
         "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (tmp_path / "jupyter.log").read_text()[-2000:])
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def run_cell(page, index: int) -> None:
    """Run one cell with Shift+Enter, retrying while the kernel is still connecting."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    for _ in range(6):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function(
                "i => /\\[[0-9*]+\\]/.test(document.querySelectorAll('.jp-Notebook .jp-Cell')[i]"
                ".querySelector('.jp-InputPrompt').textContent)", arg=index, timeout=15_000)
            return
        except Exception:  # noqa: BLE001 - the kernel was not ready; try again
            continue
    raise AssertionError(f"cell {index} never ran")


def test_brush_stroke_in_jupyterlab_changes_the_mask(jupyter, tmp_path):
    from playwright.sync_api import sync_playwright
    url, token = jupyter
    session = Session.create(tmp_path / "session", data.coffee(), resolution=128, multiple=8)
    segment_session(session, 0, num_items=4)
    after = tmp_path / "after.npy"
    (tmp_path / "editor.ipynb").write_text(json.dumps(notebook([
        "import numpy as np, widgets\n"
        "from dedit_nb.session import Session\n"
        f"ui = widgets.ItemsEditor(Session.open(r'{tmp_path / 'session'}'), display_width=512)\n"
        "ui.editor.size.value = 3\n"
        "new_item = ui.state.add_item('stroke')\n"
        "ui",
        f"np.save(r'{after}', ui.state.labels)",
    ])))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(f"{url}/lab/tree/editor.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        run_cell(page, 0)
        canvas = page.locator(".jp-OutputArea canvas").first
        try:
            canvas.wait_for(state="visible", timeout=90_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            shutil.copy(tmp_path / "failure.png", "/tmp/browser-failure.png") if os.environ.get("DEDIT_DEBUG") else None
            raise
        page.wait_for_timeout(1500)
        box = canvas.bounding_box()
        scale = box["width"] / session.images[0].size[0]   # image pixels -> screen pixels
        y = box["y"] + 40.5 * scale
        page.mouse.move(box["x"] + 20.5 * scale, y)
        page.mouse.down()
        for x in range(22, 61, 2):
            page.mouse.move(box["x"] + (x + 0.5) * scale, y)
        page.mouse.up()
        page.wait_for_timeout(1500)
        if os.environ.get("DEDIT_SCREENSHOT"):
            page.locator(".jp-OutputArea-output").first.screenshot(path=os.environ["DEDIT_SCREENSHOT"])
        run_cell(page, 1)
        for _ in range(120):
            if after.exists():
                break
            page.wait_for_timeout(500)
        browser.close()
    assert after.exists(), "the kernel never saved the labels"
    labels = np.load(after)
    original = session.images[0].labels
    stroke = labels == 4
    assert stroke[40, 22:59].all()                           # the stroke's pixels went to the new item
    rows, cols = np.nonzero(stroke)
    assert rows.min() >= 40 - 4 and rows.max() <= 40 + 4 and cols.min() >= 20 - 4 and cols.max() <= 60 + 4
    assert np.array_equal(labels[~stroke], original[~stroke])   # nothing else changed
