"""Sizes as SD users expect: short side = resolution, aspect kept (crop < one multiple, never a stretch), any
side a multiple of the latent factor, the UNet's ceil-sized levels handled."""
import numpy as np
import pytest

from dedit_nb.edits import Editor
from dedit_nb.finetune import FinetuneConfig, finetune
from dedit_nb.images import fit_working_size, resize_rgb
from dedit_nb.models import load_model
from dedit_nb.session import Session
from conftest import three_item_labels


@pytest.mark.parametrize("size", [(600, 400), (400, 600), (2048, 1536), (1001, 333), (512, 512), (77, 300)])
@pytest.mark.parametrize("resolution,multiple", [(512, 8), (64, 8), (96, 64)])
def test_working_size_keeps_the_aspect_and_crops_less_than_a_multiple(size, resolution, multiple):
    fit = fit_working_size(*size, resolution, multiple)
    (w, h), (rw, rh) = fit.size, fit.resized
    assert w % multiple == 0 and h % multiple == 0
    assert 0 <= rw - w < multiple and 0 <= rh - h < multiple            # cropped, by less than one multiple
    assert min(rw, rh) == resolution                                    # the short side is the resolution
    scale = rw / size[0]
    assert abs(rh - size[1] * scale) <= 1                               # one factor for both sides: no stretch


def test_a_session_crops_instead_of_stretching_and_records_it(tmp_path, photo):
    rgb = np.ascontiguousarray(photo[:, :590])                          # 590 x 400
    labels = np.zeros(rgb.shape[:2], np.int32)
    labels[:, 295:] = 1
    s = Session.create(tmp_path / "s", rgb, resolution=64, multiple=8, labels=labels, item_names=["l", "r"])
    entry = Session.open(tmp_path / "s").images[0]
    assert entry.size == (88, 64)                                       # 94.4 px resized to 94, cropped to 88
    assert entry.fit == {"source": [590, 400], "resized": [94, 64], "crop": [3, 0, 91, 64],
                         "method": "resize keeping the aspect ratio, centre crop to a multiple"}
    assert np.array_equal(entry.working, resize_rgb(rgb, (94, 64))[:, 3:91])
    assert (entry.labels[:, :44] == 0).all() and (entry.labels[:, 44:] == 1).all()   # same crop as the pixels
    assert s.images[0].fit == entry.fit


def test_odd_latent_sizes_finetune_and_edit_with_exact_hard_pixels(tmp_path, photo, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["offline"]))                 # pixel space: latent factor 1
    s = Session.create(tmp_path / "s", photo, resolution=13, multiple=model.latent_factor)
    h, w = s.images[0].labels.shape
    assert (w, h) == (20, 13)                                           # UNet levels 13x20 -> 7x10
    s.set_items(0, three_item_labels(h, w), ["left", "right", "top"])
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    result = Editor(model, s, progress=False).move(0, {"top": (2, 1)}, steps=2, guidance=2.0, edge_thickness=1)
    hard = result.regions.hard
    assert hard.any() and np.array_equal(result.images[0][hard], s.images[0].working[hard])
    assert result.manifest["fit"]["resized"] == [20, 13]
