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
