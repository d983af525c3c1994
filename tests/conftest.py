"""Shared fixtures: tiny random models of every family, saved and re-loaded through load_model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import pytest
import torch

from dedit_nb.models import load_model
from dedit_nb.testing import build_tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ["sd", "sdxl", "offline"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: build_tiny_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_model_dirs, family):
    return load_model(str(tiny_model_dirs[family]))


def finetune_stopping_at(stage: str, step: int):
    """A finetune callback that stops the finetune at its first step of ``stage`` numbered ``step`` or later."""
    def callback(run, at_stage, at_step, callback_kwargs):
        if at_stage == stage and at_step >= step:
            run.stop()
        return callback_kwargs
    return callback


def three_item_labels(h, w):
    """Left, right and a top band: a simple partition with items of different sizes."""
    labels = np.zeros((h, w), np.int32)
    labels[:, w // 2:] = 1
    labels[: h // 3, :] = 2
    return labels


@pytest.fixture
def photo():
    from skimage import data
    return data.coffee()
