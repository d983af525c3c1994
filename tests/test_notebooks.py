"""The three notebooks through papermill on a tiny model, and batch grids (local pool and Dask)."""
import json
from pathlib import Path

import pytest

from dedit_nb.batch import expand, run_batch
from dedit_nb.session import Session

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


def execute(name, out, **parameters):
    import papermill as pm
    return pm.execute_notebook(str(NB / name), str(out), parameters=parameters, cwd=str(NB), progress_bar=False)


@pytest.fixture(scope="module")
def finetuned_session(tmp_path_factory, tiny_model_dirs):
    tmp = tmp_path_factory.mktemp("nb")
    session_dir = tmp / "session"
    execute("01_segment.ipynb", tmp / "01.ipynb", image_path=str(ROOT / "examples" / "scene_a.png"),
            session_dir=str(session_dir), resolution=32, multiple=8, num_items=3, interactive=False)
    s = Session.open(session_dir)
    assert len(s.images[0].items) == 3 and s.images[0].labels.shape == (32, 32)
    execute("02_finetune.ipynb", tmp / "02.ipynb", session_dir=str(session_dir), model=str(tiny_model_dirs["offline"]),
            num_tokens=2, stage1_steps=2, stage2_steps=2, batch_size=1, recon_steps=2)
    s = Session.open(session_dir)
    assert s.has_weights and s.finetune_state["done"] and s.model_id == str(tiny_model_dirs["offline"])
    executed = json.loads((tmp / "02.ipynb").read_text())
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in executed["cells"] for o in c.get("outputs", []))          # the loss plot and the recon
    assert any("memory: cpu memory is not checked" in "".join(o.get("text", ""))   # the memory line, before training
               for c in executed["cells"] for o in c.get("outputs", []))
    return tmp, session_dir, str(tiny_model_dirs["offline"])


def test_edit_notebook_writes_outputs_matching_its_parameters(finetuned_session):
    tmp, session_dir, model = finetuned_session
    out = tmp / "edit"
    params = dict(session_dir=str(session_dir), model=model, edit="text", item=1, prompt="a white circle",
                  strength=0.4, guidance=2.5, steps=3, edge_thickness=1, seed=11, num_images=2, output_dir=str(out),
                  interactive=False)
    execute("03_edit.ipynb", tmp / "03.ipynb", **params)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "text" and manifest["params"]["prompt"] == "a white circle"
    assert manifest["params"]["item_index"] == 1 and manifest["seeds"] == [11, 12]
    assert {k: manifest["sampling"][k] for k in ("strength", "guidance", "steps", "edge_thickness", "num_images")} == \
        {"strength": 0.4, "guidance": 2.5, "steps": 3, "edge_thickness": 1, "num_images": 2}
    assert sorted(manifest["files"]["images"]) == ["image_0.png", "image_1.png"]
    for f in ["image_0.png", "image_1.png", "hard.png", "soft.png", "active.png", "labels.npy"]:
        assert (out / f).exists()


def test_a_wrong_parameter_fails_early_and_names_it(finetuned_session):
    import papermill as pm
    tmp, session_dir, model = finetuned_session
    before = (session_dir / "session.json").read_bytes()
    for bad, name in [({"edit": "recolour"}, "edit"), ({"item": "chair"}, "item"),
                      ({"edit": "image", "source_item": 0, "source_session": str(tmp)}, "source_session"),
                      ({"strength": 2.0}, "strength"), ({"steps": 1.5}, "steps"), ({"guidance": "high"}, "guidance"),
                      ({"steps": "10"}, "steps"), ({"strenght": 0.8}, "strenght")]:
        with pytest.raises(pm.PapermillExecutionError) as err:
            execute("03_edit.ipynb", tmp / "bad.ipynb", session_dir=str(session_dir), model=model,
                    output_dir=str(tmp / "bad"), interactive=False, **bad)
        assert f"parameter '{name}'" in str(err.value)
        # after parameters and injected parameters: the check cell, before any model loads
        assert err.value.exec_count == 3
    assert (session_dir / "session.json").read_bytes() == before
    assert not (tmp / "bad").exists()


def test_segment_notebook_with_a_missing_checkpoint_creates_nothing(tmp_path):
    import papermill as pm
    params = dict(image_path=str(ROOT / "examples" / "scene_a.png"), session_dir=str(tmp_path / "s"), resolution=32,
                  multiple=8, segmenter="sam", checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth"), interactive=False)
    with pytest.raises(pm.PapermillExecutionError, match="parameter 'checkpoint'"):
        execute("01_segment.ipynb", tmp_path / "01.ipynb", **params)
    assert not (tmp_path / "s").exists()
    execute("01_segment.ipynb", tmp_path / "01.ipynb", **{**params, "segmenter": "offline", "num_items": 2})
    assert len(Session.open(tmp_path / "s").images[0].items) == 2


def test_grid_expansion():
    spec = {"parameters": {"a": 1}, "grid": {"b": [1, 2], "c": ["x", "y"]}, "runs": [{"a": 5}]}
    sets = expand(spec)
    assert len(sets) == 5 and sets[0] == {"a": 1, "b": 1, "c": "x"} and sets[-1] == {"a": 5}


def test_batch_continues_past_a_failed_run_and_reports_it(finetuned_session):
    tmp, session_dir, model = finetuned_session
    spec = {"notebook": str(NB / "03_edit.ipynb"), "output": str(tmp / "batch"), "workers": 2,
            "parameters": {"session_dir": str(session_dir), "model": model, "edit": "text", "item": 1, "steps": 2,
                           "num_images": 1, "edge_thickness": 1},
            "grid": {"prompt": ["a white circle", "a green circle"], "seed": [0, 1]},
            "runs": [{"edit": "remove", "item": "chair"}]}
    recorded = len(Session.open(session_dir).history)
    results = run_batch(spec)
    assert len(Session.open(session_dir).history) == recorded + 4       # 2 workers at once: no record lost
    assert [r.ok for r in results] == [True, True, True, True, False]
    assert "parameter 'item'" in results[-1].error and results[-1].failed_cell == 3
    report = json.loads((tmp / "batch" / "report.json").read_text())
    assert report["ok"] == 4 and report["failed"] == 1
    index = (tmp / "batch" / "index.md").read_text()
    assert "4 of 5 runs succeeded" in index and "FAILED" in index and "a green circle" in index
    from PIL import Image
    sheet = Image.open(tmp / "batch" / "contact_sheet.png")
    assert sheet.size[0] == 4 * 160 and sheet.size[1] >= 2 * 160
    for r in results[:4]:
        m = json.loads((Path(r.folder) / "manifest.json").read_text())
        assert m["params"]["prompt"] == r.parameters["prompt"] and m["sampling"]["seed"] == r.parameters["seed"]
        assert (Path(r.folder) / "notebook.ipynb").exists()


def test_batch_on_a_dask_cluster(finetuned_session):
    from dask.distributed import LocalCluster
    tmp, session_dir, model = finetuned_session
    spec = {"notebook": str(NB / "03_edit.ipynb"), "output": str(tmp / "dask"),
            "parameters": {"session_dir": str(session_dir), "model": model, "edit": "recon", "steps": 2,
                           "num_images": 1},
            "grid": {"seed": [3, 4]}}
    recorded = len(Session.open(session_dir).history)
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        results = run_batch(spec, scheduler=cluster.scheduler_address)
    assert [r.ok for r in results] == [True, True]
    assert len(Session.open(session_dir).history) == recorded + 2
    seeds = [json.loads((Path(r.folder) / "manifest.json").read_text())["seeds"] for r in results]
    assert seeds == [[3], [4]]
