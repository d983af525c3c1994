"""dedit_nb's workbench helpers: the model-domain check, the shared colours and defaults, rerun folders."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedit_nb import masks as M
from dedit_nb.display import (ITEM_COLOURS, REGION_COLOURS, edit_summary, item_borders, item_overlay,
                              item_thumbnails, region_picture, tidy_numbers)
from dedit_nb.domain import (MIN_RECON_PSNR, RECOMMENDED_MODEL, domain_notes, psnr, reconstruction_note,
                             scene_likeness)
from dedit_nb.offline.scenes import random_scene
from dedit_nb.profiles import EXAMPLES
from dedit_nb.reruns import EDIT_MARKER, choose_folder
from dedit_nb.session import Session

ROOT = Path(__file__).resolve().parents[1]


def test_offline_domain_check_tells_scenes_from_photos(tmp_path):
    rng = np.random.default_rng(5)
    assert min(scene_likeness(random_scene(rng).image) for _ in range(40)) >= 0.85
    for name in ("coffee.jpg", "astronaut.jpg"):
        assert scene_likeness(np.asarray(Image.open(EXAMPLES / name).convert("RGB"))) < 0.4
    scene = Session.create(tmp_path / "scene", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    photo = Session.create(tmp_path / "photo", EXAMPLES / "coffee.jpg", resolution=32, multiple=8)
    assert domain_notes(scene, "offline") == []
    notes = domain_notes(photo, "offline")
    assert len(notes) == 1 and f'model="{RECOMMENDED_MODEL}"' in notes[0] and "coffee" in notes[0]
    assert "in 01_segment (the working size follows the model), 02_finetune and 03_edit" in \
        domain_notes(photo, notebook="01_segment")[0]
    assert "SD 1.x works at 512 px, not 32" in notes[0]            # one source: the SD 1.x profile's size
    assert domain_notes(photo, RECOMMENDED_MODEL) == []             # only the offline model has a known domain
    grey = np.repeat(np.asarray(Image.open(EXAMPLES / "astronaut.jpg").convert("L"))[..., None], 3, -1)
    assert domain_notes(Session.create(tmp_path / "grey", grey, resolution=32, multiple=8)) != []  # texture counts


def test_reconstruction_note_flags_noise_not_a_faithful_recon():
    rng = np.random.default_rng(0)
    image = random_scene(rng).image
    close = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, image.shape, dtype=np.uint8)
    assert psnr(image, close) > MIN_RECON_PSNR and reconstruction_note(image, close) is None
    assert psnr(image, noise) < MIN_RECON_PSNR
    note = reconstruction_note(image, noise, "offline")
    assert note and "PSNR" in note and f'model="{RECOMMENDED_MODEL}"' in note
    assert psnr(image, image) == float("inf")


def test_item_overlay_draws_exact_palette_colours():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), np.int32)
    labels[:, 10:] = 1
    labels[5:15, 20:28] = 2
    solid = item_overlay(image, labels, "solid")
    assert np.array_equal(solid, ITEM_COLOURS[labels])                   # exactly the swatch colours
    outline = item_overlay(image, labels, "outline")
    border = item_borders(labels)
    assert np.array_equal(outline[border], ITEM_COLOURS[labels[border]])   # each side of a border its own colour
    assert np.array_equal(outline[~border], image[~border])              # the image elsewhere, untouched
    assert border[:, 9].all() and border[:, 10].all() and not border[:, 5].any()
    hidden = item_overlay(image, labels, "solid", visible=[True, False, True])
    assert np.array_equal(hidden[labels == 1], image[labels == 1])
    with pytest.raises(ValueError, match="outline"):
        item_overlay(image, labels, "blend")
    assert len({tuple(c) for c in ITEM_COLOURS}) == len(ITEM_COLOURS)    # distinct


def test_region_colours_and_readable_numbers():
    regions = M.edit_regions(np.eye(8, dtype=bool), 1)
    picture = region_picture(regions)
    assert np.array_equal(picture[regions.hard], np.broadcast_to(REGION_COLOURS[0], picture[regions.hard].shape))
    assert np.array_equal(picture[regions.active], np.broadcast_to(REGION_COLOURS[2], picture[regions.active].shape))
    assert tidy_numbers({"g": 5.000000000000001, "s": [0.30000000000000004, 2], "n": "x", "b": True}) == \
        {"g": 5.0, "s": [0.3, 2], "n": "x", "b": True}
    summary = edit_summary("text", {"item": "gold & <b>", "prompt": "a" * 100, "item_index": 1})
    assert summary.startswith("text · item: gold & <b> · prompt: ") and summary.endswith("…") and "{" not in summary
    composed = edit_summary("composed", {"operations": [{"kind": "remove", "item": "bag", "item_index": 1},
                                                        {"kind": "add", "name": "hat", "prompt": "a red hat"}]})
    assert composed == "composed: remove · item: bag + add · name: hat · prompt: a red hat"


def test_rerun_folders_are_numbered_never_overwritten(tmp_path):
    first = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    folder, note = choose_folder(tmp_path / "s")
    assert folder == tmp_path / "s-2" and "overwrite=True" in note and str(tmp_path / "s-2") in note
    Session.create(folder, EXAMPLES / "scene_b.png", resolution=32, multiple=8)
    assert choose_folder(tmp_path / "s")[0] == tmp_path / "s-3"
    assert choose_folder(tmp_path / "s", overwrite=True) == (tmp_path / "s", None)
    assert choose_folder(tmp_path / "new") == (tmp_path / "new", None)
    assert Session.open(first.folder).images[0].name == "scene_a"       # the first session is untouched
    import os
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "s")
        assert choose_folder(".")[0] == tmp_path / "s-3"                   # '.' is numbered like its name
    finally:
        os.chdir(here)
    (tmp_path / "edit").mkdir()
    assert choose_folder(tmp_path / "edit", marker=EDIT_MARKER)[0] == tmp_path / "edit"   # empty: used
    (tmp_path / "edit" / EDIT_MARKER).write_text("{}")
    assert choose_folder(tmp_path / "edit", marker=EDIT_MARKER, what="an edit")[0] == tmp_path / "edit-2"


def test_item_thumbnails_show_each_item_as_it_is_in_the_photo():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), np.int32)
    labels[5:25, 10:30] = 1                  # a 20x20 item
    labels[30:34, 2:50] = 3                  # a thin 4x48 one; item 2 has no pixels
    thumbs = item_thumbnails(image, labels, size=20)
    assert len(thumbs) == 4
    assert np.array_equal(thumbs[1], image[5:25, 10:30])                       # its own pixels, unscaled
    assert (thumbs[2] == 255).all()                                            # empty: a white square
    assert len(item_thumbnails(image, labels, num_items=5)) == 5 and (item_thumbnails(image, labels, 5)[4] == 255).all()
    assert thumbs[3].shape[:2] == (2, 20)                                      # aspect kept inside 20x20
    assert thumbs[0].shape[:2] == (13, 20)                                     # item 0's box is the whole image
    small = item_thumbnails(image, labels, size=60)[0]                         # unscaled: compare pixel by pixel
    own, other = labels == 0, labels != 0
    assert np.array_equal(small[own], image[own])
    assert (small[other].astype(int) >= image[other]).all() and (small[other] > image[other]).any()
    assert np.abs(small[other].astype(int) - (image[other] * 0.25 + 255 * 0.75).round()).max() <= 1


# --- what the notebooks say between their steps (issue 23.3, 23.4, 23.9) ------------------------------------

def test_a_rerun_note_names_the_session_dir_for_02_and_03_as_the_user_wrote_it(tmp_path, monkeypatch):
    from dedit_nb.notebook import choose_session_folder
    monkeypatch.chdir(tmp_path)
    Session.create(Path("runs/s"), EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    folder, note = choose_session_folder("runs/s")
    assert folder == Path("runs/s-2")                                    # relative, as given
    assert 'set session_dir="runs/s-2"' in note and "02_finetune and 03_edit" in note
    assert str(tmp_path) not in note                                     # no absolute path for a relative one
    assert choose_session_folder("runs/new") == (Path("runs/new"), None)


def test_03_refuses_a_session_that_is_not_finetuned_before_loading_a_model(tmp_path):
    from dedit_nb.notebook import ParameterError, check_finetuned
    s = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    with pytest.raises(ParameterError, match="run 02_finetune on it first"):
        check_finetuned(s)


def test_02_stops_on_a_photo_unless_forced_and_errors_are_one_line(tmp_path):
    from dedit_nb.notebook import NotebookStop, ParameterError, check_domain, check_values, NOTEBOOK_PARAMETERS
    photo = Session.create(tmp_path / "photo", EXAMPLES / "coffee.jpg", resolution=32, multiple=8)
    scene = Session.create(tmp_path / "scene", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    assert check_domain([scene], "offline") == []
    with pytest.raises(NotebookStop, match="stopped before training.*force=True") as stop:
        check_domain([scene, photo], "offline")
    assert len(stop.value._render_traceback_()) == 1                      # one line in a notebook, no traceback
    assert len(check_domain([photo], "offline", force=True)) == 1         # forced: the note, then training
    assert check_domain([photo], "offline", notebook="03_edit")            # 03 repeats it without stopping
    with pytest.raises(ParameterError) as bad:
        check_values(NOTEBOOK_PARAMETERS["03_edit"], {"steps": "10"})       # typed in a notebook, not papermill
    assert "-p" not in str(bad.value) and len(bad.value._render_traceback_()) == 1


def test_an_interrupted_finetune_ends_in_one_line_saying_where_it_saved(tmp_path, tiny_model_dirs, monkeypatch):
    from dedit_nb import FinetuneConfig, load_model
    from dedit_nb import notebook as nbk
    model = load_model(str(tiny_model_dirs["offline"]))
    s = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    config = FinetuneConfig(num_tokens=1, stage1_steps=2, stage2_steps=4)
    real = nbk.finetune

    def interrupted(*args, **kwargs):
        def stop(run, stage, step, callback_kwargs):                      # the kernel's stop button at stage 2
            if stage == "stage2" and step == 2:
                raise KeyboardInterrupt
            return callback_kwargs
        return real(*args, callback=stop, progress=False, **kwargs)

    monkeypatch.setattr(nbk, "finetune", interrupted)
    with pytest.raises(nbk.NotebookStop) as stop:
        nbk.finetune_in_notebook(model, s, config)
    state = Session.open(s.folder).finetune_state
    assert f"saved at stage {state['stage']} step {state['step']}; run the cell again to resume" in str(stop.value)
    monkeypatch.setattr(nbk, "finetune", real)
    assert nbk.finetune_in_notebook(model, Session.open(s.folder), config).completed   # and it resumes


def test_02_records_the_reconstruction_psnr_and_03_repeats_it(tmp_path):
    from dedit_nb.notebook import edit_notes, record_reconstruction
    s = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    original = s.images[0].working
    noisy = np.clip(original.astype(int) + np.random.default_rng(0).integers(-120, 120, original.shape), 0, 255)
    assert record_reconstruction(s, original, noisy.astype(np.uint8), "offline") is not None   # far: warned
    value = psnr(original, noisy.astype(np.uint8))
    notes = edit_notes(Session.open(s.folder), "offline")
    assert any(f"PSNR {value:.1f} dB" in n and f"below {MIN_RECON_PSNR:.0f} dB" in n for n in notes)


def test_the_hard_region_reads_on_light_and_dark_themes_and_the_legend_names_each_chip():
    from dedit_nb.display import REGION_COLOURS
    from dedit_nb.segment import overlay_figure
    from dedit_nb.segment.offline import segment_offline

    def luminance(rgb):
        c = np.asarray(rgb, np.float64) / 255
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    def contrast(a, b):
        la, lb = sorted((luminance(a), luminance(b)), reverse=True)
        return (la + 0.05) / (lb + 0.05)

    for background in ((255, 255, 255), (17, 17, 17)):                     # JupyterLab light, dark
        assert contrast(REGION_COLOURS[0], background) >= 3                 # WCAG's minimum for graphics
    image = np.asarray(Image.open(EXAMPLES / "scene_a.png").convert("RGB"))
    figure = overlay_figure(image, segment_offline(image, num_items=3))
    texts = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    from dedit_nb.display import ITEM_COLOUR_NAMES, item_colour_name
    from dedit_nb.segment.offline import colour_name
    assert [t.rsplit("drawn ", 1)[1] for t in texts] == [item_colour_name(k) for k in range(3)]
    assert len(ITEM_COLOUR_NAMES) == len(ITEM_COLOURS)
    for k in range(6):                                                        # the names say the chips' colours
        assert colour_name(ITEM_COLOURS[k]) == ITEM_COLOUR_NAMES[k]
