"""End to end in a real browser: JupyterLab on a free localhost port, Debian's headless Chromium driven by
Playwright, a notebook that shows the editor, keys, colours, a brush stroke drawn with the mouse and the wheel,
checked in the page and from the kernel.

Set DEDIT_SCREENSHOT=path to also save a screenshot of the editor and palette, DEDIT_PANEL_SCREENSHOT=path one
of 03's edit panel with a pending move (both used for the README).
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


XSS = "<img src=x onerror=\"window.__dedit_xss = 1\">"

# What a page of widgets must never show, at any window width: anything wider than the output area, a label,
# button or toggle cut short ("polyg…"), a canvas not wholly in view, or a status line taller than one line.
LAYOUT_PROBLEMS = """root => {
  const problems = [], area = root.getBoundingClientRect();
  const shown = el => el.offsetParent !== null && el.getBoundingClientRect().width > 0;
  for (const el of root.querySelectorAll('.jupyter-widgets, button, canvas, input, select, label')) {
    if (!shown(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.right > area.right + 1 || r.left < area.left - 1)
      problems.push(`wider than the output: ${el.tagName}.${el.className} ${r.left | 0}..${r.right | 0} of `
                    + `${area.left | 0}..${area.right | 0} ${(el.textContent || '').trim().slice(0, 30)}`);
  }
  for (const el of root.querySelectorAll('button, .widget-label, label, .widget-toggle-button')) {
    if (shown(el) && el.scrollWidth > el.clientWidth + 1 && (el.textContent || '').trim())
      problems.push(`truncated: ${(el.textContent || '').trim()}`);
  }
  for (const canvas of root.querySelectorAll('canvas')) {
    if (!shown(canvas)) continue;
    const r = canvas.getBoundingClientRect();
    if (Math.abs(r.width / r.height - canvas.width / canvas.height) > 0.02)
      problems.push(`canvas distorted: ${r.width}x${r.height}`);
    for (let up = canvas.parentElement; up && up !== document.body; up = up.parentElement) {
      const box = up.getBoundingClientRect(), style = getComputedStyle(up);
      if (style.overflowX !== 'visible' && (r.left < box.left - 1 || r.right > box.right + 1))
        problems.push(`canvas clipped by ${up.className}: ${r.left | 0}..${r.right | 0} in ${box.left | 0}..${box.right | 0}`);
    }
  }
  for (const status of root.querySelectorAll('.dedit-status'))
    if (shown(status) && status.getBoundingClientRect().height > 26)
      problems.push(`status on more than one line: ${status.getBoundingClientRect().height}px`);
  return problems;
}"""


def screenshot(page, element, path: str) -> None:
    """``element`` as a user sees it, without JupyterLab's news toast over it."""
    page.evaluate("() => document.querySelectorAll('.Toastify').forEach(el => el.remove())")
    element.screenshot(path=path)


def layout_problems(page, output, widths=(900, 1500)) -> dict:
    """LAYOUT_PROBLEMS of ``output`` with the window at each width (JupyterLab's default panels open)."""
    found = {}
    for width in widths:
        page.set_viewport_size({"width": width, "height": 1100})
        page.wait_for_timeout(1200)
        found[width] = output.evaluate(LAYOUT_PROBLEMS)
        if os.environ.get("DEDIT_DEBUG"):
            print(width, *found[width], sep="\n")
        if os.environ.get("DEDIT_DEBUG"):
            page.screenshot(path=f"/tmp/browser-{width}.png", full_page=True)
    page.set_viewport_size({"width": 1500, "height": 1100})
    page.wait_for_timeout(800)
    return {w: p for w, p in found.items() if p}


def open_in_lab(playwright, url: str, token: str, name: str):
    """Chromium on ``name.ipynb`` in JupyterLab, the kernel idle and the first cell run."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{url}/lab/tree/{name}.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    run_cell(page, 0)
    return browser, page


def test_brush_stroke_in_jupyterlab_changes_the_mask(jupyter, tmp_path):
    """One editor session in a real browser: a hostile label stays text, shortcuts work on hover without a
    painting click, buttons fit, the cursor is the brush outline, the swatch is the canvas colour, a brush
    stroke changes exactly its pixels, the status turns "unsaved", and the wheel zooms."""
    from playwright.sync_api import sync_playwright
    from dedit_nb.display import item_borders, item_colour
    url, token = jupyter
    session = Session.create(tmp_path / "session", data.coffee(), resolution=128, multiple=8)
    segment_session(session, 0, num_items=4)
    session.rename_item(0, 0, XSS)
    after, report = tmp_path / "after.npy", tmp_path / "report.json"
    (tmp_path / "editor.ipynb").write_text(json.dumps(notebook([
        "import json, numpy as np, widgets\n"
        "from dedit_nb.session import Session\n"
        f"ui = widgets.ItemsEditor(Session.open(r'{tmp_path / 'session'}'), display_width=512)\n"
        "ui.mask_editor.size.value = 3\n"
        "new_item = ui.state.add_item('stroke')\n"
        "ui.state.selected = 0\n"
        "ui",
        f"np.save(r'{after}', ui.state.labels)\n"
        f"open(r'{report}', 'w').write(json.dumps(dict(zoom=ui.mask_editor.zoom, tool=ui.mask_editor.tool.value)))",
    ])))
    labels = session.images[0].labels
    border = item_borders(labels)
    inner = border & np.roll(border, 1, 0) & np.roll(border, -1, 0) & np.roll(border, 1, 1) & np.roll(border, -1, 1)
    inner &= labels == 1
    inner[:, :2] = inner[:, -2:] = inner[:2] = inner[-2:] = False
    border_y, border_x = (int(v[0]) for v in np.nonzero(inner))            # a pixel of item 1's outline
    with sync_playwright() as p:
        browser, page = open_in_lab(p, url, token, "editor")
        canvas = page.locator(".jp-OutputArea canvas").first
        try:
            canvas.wait_for(state="visible", timeout=90_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            shutil.copy(tmp_path / "failure.png", "/tmp/browser-failure.png") if os.environ.get("DEDIT_DEBUG") else None
            raise
        page.wait_for_timeout(1500)
        output = page.locator(".jp-OutputArea-output").first
        assert page.evaluate("window.__dedit_xss") is None                   # the label's handler never ran
        assert "<img src=x" in output.locator(".dedit-status").inner_text()  # shown as text, not markup
        output.locator(".dedit-item-name input").first.fill("cup")         # rename it in the palette
        page.keyboard.press("Enter")
        output.locator(".dedit-swatch").nth(4).click()                       # select the new item
        page.wait_for_function("() => /stroke/.test(document.querySelector('.dedit-status').textContent) && "
                               "!/img src/.test(document.querySelector('.dedit-status').textContent)",
                               timeout=10_000)
        cells = page.locator(".jp-Notebook .jp-Cell").count()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)   # hover, no click
        page.wait_for_timeout(300)
        page.keyboard.press("e")
        active_tool = ("() => document.querySelector('.jp-OutputArea-output .widget-toggle-buttons "
                       "button.mod-active').textContent.trim()")
        page.wait_for_function(f"({active_tool})() === 'eraser'", timeout=10_000)
        page.wait_for_function("() => /eraser/.test(document.querySelector('.dedit-tool').textContent)",
                               timeout=10_000)                               # the status names the current tool
        page.keyboard.press("b")
        page.wait_for_function(f"({active_tool})() === 'brush'", timeout=10_000)
        assert page.locator(".jp-Notebook .jp-Cell").count() == cells        # the keys did not reach JupyterLab
        label = output.locator(".dedit-item-name input").nth(2)
        label.click()                                                        # a text box has focus ...
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)   # ... and the pointer rests
        page.wait_for_timeout(300)                                           # on the canvas
        page.keyboard.type(" bag", delay=30)
        page.wait_for_timeout(500)
        assert page.evaluate(f"({active_tool})()") == "brush"                # no tool changed ...
        assert label.input_value().endswith(" bag")                           # ... the letters went to the box
        page.mouse.move(5, 5)
        assert page.evaluate("() => document.activeElement.closest('.dedit-item-name') !== null")
        label.fill(label.input_value()[:-4])                                 # the name as it was
        page.keyboard.press("Enter")
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert layout_problems(page, output) == {}
        box = canvas.bounding_box()
        cursor = canvas.evaluate("el => getComputedStyle(el).cursor")
        assert "data:image/svg+xml" in cursor                                # the brush outline
        overflowing = output.evaluate(
            "el => [...el.querySelectorAll('button')].filter(b => b.offsetParent && b.scrollWidth > b.clientWidth + 1)"
            ".map(b => b.textContent.trim())")
        assert overflowing == []                                             # no "polyg…"
        titles = output.evaluate("el => [...el.querySelectorAll('.widget-toggle-buttons button')]"
                                 ".map(b => b.title)")
        assert titles and all(titles)                                        # tooltips on the tools
        assert output.locator("button:has-text('redo')").is_disabled()
        swatch = output.locator(".dedit-swatch").nth(1).evaluate("el => getComputedStyle(el).backgroundColor")
        assert swatch == "rgb({}, {}, {})".format(*item_colour(1))
        shot = tmp_path / "canvas.png"
        canvas.screenshot(path=str(shot))
        from PIL import Image
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        scale = pixels.shape[1] / session.images[0].size[0]
        seen = pixels[int((border_y + 0.5) * scale), int((border_x + 0.5) * scale)]
        assert tuple(int(c) for c in seen) == item_colour(1)                 # the canvas shows the swatch colour
        scale = box["width"] / session.images[0].size[0]   # image pixels -> screen pixels
        y = box["y"] + 40.5 * scale
        page.mouse.move(box["x"] + 20.5 * scale, y)
        page.mouse.down()
        for x in range(22, 61, 2):
            page.mouse.move(box["x"] + (x + 0.5) * scale, y)
        page.mouse.up()
        page.wait_for_timeout(1500)
        assert "unsaved changes" in output.locator(".dedit-status").inner_text()
        if os.environ.get("DEDIT_SCREENSHOT"):
            screenshot(page, output, os.environ["DEDIT_SCREENSHOT"])
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -300)
        page.wait_for_timeout(1000)
        run_cell(page, 1)
        for _ in range(120):
            if report.exists():
                break
            page.wait_for_timeout(500)
        browser.close()
    assert after.exists() and report.exists(), "the kernel never saved the labels"
    state = json.loads(report.read_text())
    assert state["zoom"] > 1 and state["tool"] == "brush"
    labels = np.load(after)
    original = session.images[0].labels
    stroke = labels == 4
    assert stroke[40, 22:59].all()                           # the stroke's pixels went to the new item
    rows, cols = np.nonzero(stroke)
    assert rows.min() >= 40 - 4 and rows.max() <= 40 + 4 and cols.min() >= 20 - 4 and cols.max() <= 60 + 4
    assert np.array_equal(labels[~stroke], original[~stroke])   # nothing else changed


def test_edit_panel_in_jupyterlab(jupyter, tmp_path, tiny_model_dirs):
    """03's panel in a real browser: controls follow the edit, an error shows as an error, a result lands as
    a card in a grid with a readable title and the region legend, and the dropdown moves the canvas
    selection."""
    from playwright.sync_api import sync_playwright
    from dedit_nb import FinetuneConfig, finetune, load_model
    url, token = jupyter
    model_dir = str(tiny_model_dirs["offline"])
    session = Session.create(tmp_path / "session", data.coffee(), resolution=32, multiple=8)
    labels = np.zeros(session.images[0].labels.shape, np.int32)
    labels[:, 16:] = 1
    session.set_items(0, labels, ["left side", "right & <b>side</b>"])
    finetune(load_model(model_dir), session, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1),
             progress=False)
    (tmp_path / "panel.ipynb").write_text(json.dumps(notebook([
        "import widgets\n"
        "from dedit_nb import Session, load_model\n"
        f"panel = widgets.EditPanel(load_model(r'{model_dir}'), Session.open(r'{tmp_path / 'session'}'))\n"
        "panel.steps.value = 2\n"
        "panel",
    ])))
    with sync_playwright() as p:
        browser, page = open_in_lab(p, url, token, "panel")
        output = page.locator(".jp-OutputArea")             # the panel, below any loading messages
        generate = output.locator("button:has-text('Generate')")
        generate.wait_for(state="visible", timeout=90_000)
        prompt = output.locator("input[placeholder^='a red bag']")
        assert prompt.is_visible()
        output.locator(".widget-toggle-buttons button[data-value='move']:visible").click()
        coords = output.locator("input[placeholder^='dx,dy']")
        coords.wait_for(state="visible", timeout=10_000)                     # typed moves, and every canvas
        for name in ("undo", "clear moves", "apply"):                        # button but 'apply moves'
            assert output.locator(f"button:text-is('{name}')").is_visible(), name
        assert not output.locator("button:has-text('apply moves')").is_visible()
        coords.fill("-4,2")
        coords.press("Enter")                                                # Enter applies the box
        page.wait_for_function("() => /pending moves: left side: dx=-4 dy=2/.test("
                               "document.querySelector('.dedit-status').textContent)", timeout=10_000)
        assert layout_problems(page, output.first) == {}
        if os.environ.get("DEDIT_PANEL_SCREENSHOT"):
            screenshot(page, output.first, os.environ["DEDIT_PANEL_SCREENSHOT"])
        output.locator(".widget-toggle-buttons button:has-text('remove')").click()
        page.wait_for_timeout(800)
        assert not prompt.is_visible()                                       # no prompt for a remove
        output.locator(".widget-toggle-buttons button:has-text('text')").click()
        prompt.wait_for(state="visible", timeout=10_000)
        generate.click()
        error = output.locator(".dedit-error")
        error.wait_for(state="visible", timeout=30_000)
        assert "needs prompt" in error.inner_text()
        assert error.evaluate("el => getComputedStyle(el).color") == "rgb(176, 0, 32)"   # styled as an error
        output.locator("select").first.select_option(index=1)
        page.wait_for_function("() => /right & <b>side/.test(document.querySelector('.dedit-status').textContent)",
                               timeout=10_000)                               # one selection, label as text
        prompt.fill("a red circle")
        prompt.press("Enter")
        generate.click()
        card = output.locator(".dedit-card").first
        card.wait_for(state="visible", timeout=120_000)
        title = card.locator(".dedit-card-title").inner_text()
        assert title.startswith("text · item: right & <b>side</b> · prompt: a red circle") and "{" not in title
        assert "hard" in card.inner_text() and "active" in card.inner_text()    # the region legend
        grid = card.evaluate("el => getComputedStyle(el.parentElement).display")
        assert grid == "grid"
        assert page.evaluate("window.__dedit_xss") is None
        if os.environ.get("DEDIT_DEBUG"):
            output.first.screenshot(path="/tmp/browser-panel.png")
        browser.close()
