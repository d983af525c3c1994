"""The batch index shows user strings as text: no markup from a parameter or an error reaches the page."""
from html.parser import HTMLParser

import mistune

from dedit_nb.batch import RunResult, write_report

HOSTILE = "<img src=x onerror=alert(1)> | *bold* [link](javascript:alert(2))"


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.rows = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append(0)
        if tag in ("td", "th"):
            self.rows[-1] += 1


def check_page(page: str, text_cells: int):
    tags = Tags()
    tags.feed(page)
    assert not [a for _, a in tags.tags if any(k.startswith("on") for k in a)]          # no event handler
    assert not [t for t, _ in tags.tags if t in ("strong", "em", "script")]
    assert not [a for _, a in tags.tags if "javascript:" in (a.get("href") or "")]
    assert set(tags.rows) == {text_cells}                                               # no cell split by '|'
    return tags


def test_index_md_and_html_escape_parameters_and_errors(tmp_path):
    results = [RunResult("run-000", {"prompt": HOSTILE, "seed": 0}, True, str(tmp_path / "run-000")),
               RunResult("run-001", {"prompt": "a white circle", "seed": 1}, False, str(tmp_path / "run-001"),
                         error=f"ParameterError: parameter 'item': no item {HOSTILE!r}", failed_cell=3)]
    write_report(results, tmp_path)
    md = (tmp_path / "index.md").read_text()
    rendered = mistune.create_markdown(escape=False, plugins=["table"])(md)
    check_page(rendered, 5)                             # run, prompt, seed, status, images
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered and "*bold*" in rendered
    check_page((tmp_path / "index.html").read_text(), 5)


def test_index_has_the_quality_columns_of_each_runs_first_image_escaped(tmp_path):
    import json
    import numpy as np
    from dedit_nb import masks as M
    from dedit_nb.batch import _first_quality
    from dedit_nb.edits import EditResult
    from dedit_nb.quality import quality_record, quality_summary
    original = np.zeros((24, 24, 3), np.uint8)
    active = np.zeros((24, 24), bool)
    active[8:16, 8:16] = True
    regions = M.edit_regions(active, 2)
    edited = original.copy()
    edited[active] = 200
    leaked = edited + 1
    records = [quality_record(original, img, regions) for img in (edited, leaked)]
    EditResult("text", [edited, leaked], original, np.zeros((24, 24), np.int32), regions,
               {"quality": records}).save(tmp_path / "run-000")
    first = _first_quality(tmp_path / "run-000")
    assert first == json.loads(json.dumps(records[0]))
    hostile = dict(first, weight_scores={HOSTILE: HOSTILE})
    results = [RunResult("run-000", {"seed": 0}, True, str(tmp_path / "run-000"), quality=first),
               RunResult("run-001", {"seed": 1}, True, str(tmp_path / "run-001"), quality=hostile),
               RunResult("run-002", {"seed": 2}, False, str(tmp_path / "run-002"), error="boom")]
    write_report(results, tmp_path)
    columns = len(quality_summary(hostile))                 # the plain figures and the hostile score
    md = (tmp_path / "index.md").read_text()
    rendered = mistune.create_markdown(escape=False, plugins=["table"])(md)
    check_page(rendered, 4 + columns)                       # run, seed, figures, status, images
    page = (tmp_path / "index.html").read_text()
    check_page(page, 4 + columns)
    assert "preserved px changed" in md and "<td>0</td>" in page and "<td>∞</td>" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_a_rerun_into_the_same_folder_lists_only_its_own_images(tmp_path):
    import numpy as np
    from dedit_nb import masks as M
    from dedit_nb.batch import _written_images
    from dedit_nb.edits import EditResult
    image = np.zeros((8, 8, 3), np.uint8)
    regions = M.edit_regions(np.eye(8, dtype=bool), 1)
    labels = np.zeros((8, 8), np.int32)
    EditResult("recon", [image] * 3, image, labels, regions).save(tmp_path)
    EditResult("recon", [image + 1], image, labels, regions).save(tmp_path)     # overwrite=True, fewer images
    assert sorted(p.name for p in tmp_path.glob("image_*.png")) == ["image_0.png"]
    assert _written_images(tmp_path) == ["image_0.png"]
    (tmp_path / "manifest.json").unlink()
    assert _written_images(tmp_path) == []                                  # a failed run wrote none


def test_contact_sheet_tiles_carry_their_runs_quality_figures(tmp_path, monkeypatch):
    import numpy as np
    from PIL import ImageDraw
    from dedit_nb import masks as M
    from dedit_nb.batch import contact_sheet
    from dedit_nb.quality import quality_record
    original = np.zeros((24, 24, 3), np.uint8)
    active = np.zeros((24, 24), bool)
    active[8:16, 8:16] = True
    edited = original.copy()
    edited[active] = 200
    from PIL import Image
    Image.fromarray(edited).save(tmp_path / "a.png")
    records = [quality_record(original, img, M.edit_regions(active, 2)) for img in (edited, edited + 1)]
    drawn = []
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, **kw: drawn.append((xy, text)))
    results = [RunResult(f"run-00{i}", {"seed": i}, True, str(tmp_path), images=["a.png"], quality=q)
               for i, q in enumerate(records)] + [RunResult("run-002", {"seed": 2}, False, str(tmp_path), error="x")]
    contact_sheet(results, ["seed"], tmp_path / "sheet.png")
    texts = [t for _, t in drawn]
    leaked = records[1]["preserved_pixels_changed"]
    assert texts.count("preserved px changed: 0") == 1 and f"preserved px changed: {leaked}" in texts
    assert "PSNR preserved (dB): inf" in texts and sum(t.startswith("seam: ") for t in texts) == 2   # ASCII
    height = Image.open(tmp_path / "sheet.png").height
    assert all(y < height for (_, y), _ in drawn)           # every caption line on the sheet
