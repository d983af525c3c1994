"""The three notebooks through papermill on a tiny model, and batch grids (local pool and Dask)."""
import json
from pathlib import Path

import pytest

from dedit_nb.batch import expand, run_batch
from dedit_nb.session import Session
from dedit_nb.profiles import EXAMPLES, PROFILES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


def execute(name, out, cwd=NB, **parameters):
    import papermill as pm
    return pm.execute_notebook(str(NB / name), str(out), parameters=parameters, cwd=str(cwd), progress_bar=False)


@pytest.fixture(scope="module")
def finetuned_session(tmp_path_factory, tiny_model_dirs):
    tmp = tmp_path_factory.mktemp("nb")
    session_dir = tmp / "session"
    execute("01_segment.ipynb", tmp / "01.ipynb", image_path=str(EXAMPLES / "scene_a.png"),
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
    assert any("stage 2: UNet stopped: the step limit (2)" in "".join(o.get("text", ""))  # why each stage stopped
               for c in executed["cells"] for o in c.get("outputs", []))
    assert s.finetune_state["stopped"]["stage2"] == {"reason": "step limit", "step": 2, "limit": 2}
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
    assert "memory: cpu memory is not checked" in printed(tmp / "03.ipynb")   # the memory line, before sampling


def test_edit_notebook_samples_its_edits_in_one_pass_and_refuses_a_bad_operation_early(finetuned_session):
    import numpy as np
    import papermill as pm
    tmp, session_dir, model = finetuned_session
    out = tmp / "composed"
    edits = [{"kind": "text", "item": 1, "prompt": "a white circle"}, {"kind": "remove", "item": 2},
             {"kind": "add", "name": "square", "prompt": "a green square", "box": [2, 2, 10, 8]}]
    execute("03_edit.ipynb", tmp / "03-composed.ipynb", session_dir=str(session_dir), model=model, edits=edits,
            steps=2, num_images=1, edge_thickness=1, output_dir=str(out), interactive=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "composed"
    assert [op["kind"] for op in manifest["request"]["operations"]] == ["text", "remove", "add"]
    labels = np.load(out / "labels.npy")
    assert (labels == 3).sum() == 8 * 6 and (labels[2:8, 2:10] == 3).all() and not (labels == 2).any()
    assert manifest["quality"][0]["preserved_pixels_changed"] == 0
    assert "'preserved px changed': '0'" in printed(tmp / "03-composed.ipynb")    # the quality summary
    before = (session_dir / "session.json").read_bytes()
    for bad, name in [([{"kind": "remove", "item": "chair"}], "item"), ([{"kind": "add", "prompt": "a hat"}], "mask"),
                      ([{"kind": "remove", "item": 1, "dx": 2}], "dx")]:
        with pytest.raises(pm.PapermillExecutionError) as err:
            execute("03_edit.ipynb", tmp / "bad.ipynb", session_dir=str(session_dir), model=model, edits=bad,
                    output_dir=str(tmp / "bad"), interactive=False)
        assert f"parameter '{name}'" in str(err.value) and err.value.exec_count == 4    # the check cell
    assert (session_dir / "session.json").read_bytes() == before and not (tmp / "bad").exists()


def test_a_wrong_parameter_fails_early_and_names_it(finetuned_session):
    import papermill as pm
    tmp, session_dir, model = finetuned_session
    before = (session_dir / "session.json").read_bytes()
    for bad, name in [({"edit": "recolour"}, "edit"), ({"item": "chair"}, "item"),
                      ({"edit": "image", "source_item": 0, "source_session": str(tmp)}, "source_session"),
                      ({"strength": 2.0}, "strength"), ({"steps": 1.5}, "steps"), ({"guidance": "high"}, "guidance"),
                      ({"steps": "10"}, "steps"), ({"strenght": 0.8}, "strenght"),
                      ({"model": "offline"}, "model")]:              # finetuned on another model: before loading
        with pytest.raises(pm.PapermillExecutionError) as err:
            execute("03_edit.ipynb", tmp / "bad.ipynb", **{"session_dir": str(session_dir), "model": model,
                                                            "output_dir": str(tmp / "bad"), "interactive": False, **bad})
        assert f"parameter '{name}'" in str(err.value)
        # after the setup cell, parameters and injected parameters: the check cell, before any model loads
        assert err.value.exec_count == 4
    assert (session_dir / "session.json").read_bytes() == before
    assert not (tmp / "bad").exists()


def test_segment_notebook_with_a_missing_checkpoint_creates_nothing(tmp_path):
    import papermill as pm
    params = dict(image_path=str(EXAMPLES / "scene_a.png"), session_dir=str(tmp_path / "s"), resolution=32,
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
    assert "parameter 'item'" in results[-1].error and results[-1].failed_cell == 4
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
        results = run_batch(spec, dask_scheduler=cluster.scheduler_address)
    assert [r.ok for r in results] == [True, True]
    assert len(Session.open(session_dir).history) == recorded + 2
    seeds = [json.loads((Path(r.folder) / "manifest.json").read_text())["seeds"] for r in results]
    assert seeds == [[3], [4]]


def test_edit_notebook_refuses_a_grid_that_would_run_itself(finetuned_session):
    """03 with batch_grid naming a grid whose runs set batch_grid again: refused in the batch cell before any run
    starts (it used to fork kernels without end)."""
    import papermill as pm
    tmp, session_dir, model = finetuned_session
    grid = tmp / "itself.yaml"
    grid.write_text(json.dumps({"notebook": str(NB / "03_edit.ipynb"), "output": str(tmp / "itself"),
                                "parameters": {"session_dir": str(session_dir), "model": model, "edit": "recon",
                                               "steps": 2, "num_images": 1, "batch_grid": str(grid)}}))
    with pytest.raises(pm.PapermillExecutionError, match="cannot run a grid itself"):
        execute("03_edit.ipynb", tmp / "03-itself.ipynb", session_dir=str(session_dir), model=model, edit="recon",
                steps=2, num_images=1, output_dir=str(tmp / "edit-itself"), interactive=False, batch_grid=str(grid))
    assert not (tmp / "itself").exists()


def printed(executed: Path) -> str:
    """What the cells of an executed notebook printed."""
    texts = [o.get("text", "") for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    return "".join("".join(t) if isinstance(t, list) else t for t in texts)


def test_only_model_set_takes_the_model_profile(tmp_path, tiny_model_dirs):
    """01 and 02 with nothing but ``model`` set: the working size follows the model, and the finetune trains
    with the SD 1.x profile's schedule, learning rates and batch (read back from the session), not the
    offline model's."""
    sd = str(tiny_model_dirs["sd"])
    execute("01_segment.ipynb", tmp_path / "01.ipynb", model=sd, interactive=False, cwd=tmp_path)
    session = Session.open(tmp_path / "runs" / "session_a")
    assert min(session.images[0].labels.shape) == 64                  # the tiny UNet's 32 latents x the VAE's 2
    assert session.profile["profile"] == "sd1" and set(session.profile["sources"].values()) == {"profile"}
    execute("02_finetune.ipynb", tmp_path / "02.ipynb", model=sd, cwd=tmp_path)
    config = Session.open(tmp_path / "runs" / "session_a").finetune_state["config"]
    sd1 = PROFILES["sd1"]
    assert {k: config[k] for k in ("stage1_lr", "stage2_lr", "lora_lr", "stage1_steps", "stage2_steps",
                                   "batch_size")} == \
        {"stage1_lr": sd1.stage1_lr, "stage2_lr": sd1.stage2_lr, "lora_lr": sd1.lora_lr,
         "stage1_steps": sd1.stage1_steps, "stage2_steps": sd1.stage2_steps, "batch_size": sd1.batch_size}
    assert config["profile"]["profile"] == "sd1" and config["profile"]["values"]["recon_steps"] == sd1.steps
    line = printed(tmp_path / "02.ipynb")
    assert "model profile 'sd1'" in line and "stage2_lr=5e-05 [profile]" in line


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """The package installed NON-editable into a fresh folder (what `pip install git+...` gives a Colab
    user): a copy of the sources built there, so nothing is written into the checkout."""
    import shutil
    import subprocess
    import sys
    tmp = tmp_path_factory.mktemp("installed")
    source = tmp / "source"
    for name in ("dedit_nb", "widgets"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def test_every_notebook_runs_with_defaults_from_an_empty_folder_on_the_installed_package(
        tmp_path, installed_package, monkeypatch):
    """Where Colab opens a notebook: no checkout beside it (the bundled example and the offline model come
    from the installed package), runs written under the working folder, default parameters."""
    import shutil
    import subprocess
    import sys
    monkeypatch.setenv("PYTHONPATH", str(installed_package))
    where = subprocess.run([sys.executable, "-c", "import dedit_nb; print(dedit_nb.__file__)"], check=True,
                           capture_output=True, text=True, cwd=tmp_path).stdout
    assert where.startswith(str(installed_package))
    for name in ("01_segment", "02_finetune", "03_edit"):
        shutil.copy(NB / f"{name}.ipynb", tmp_path / f"{name}.ipynb")
        import papermill as pm
        pm.execute_notebook(str(tmp_path / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"), cwd=str(tmp_path),
                            progress_bar=False)
    session = Session.open(tmp_path / "runs" / "session_a")
    offline = PROFILES["offline"]
    assert session.images[0].labels.shape == (offline.resolution, offline.resolution)
    config = session.finetune_state["config"]
    assert (config["stage1_lr"], config["stage2_lr"], config["batch_size"]) == \
        (offline.stage1_lr, offline.stage2_lr, offline.batch_size)
    assert all(config[k] == getattr(offline, k) for k in ("min_snr_gamma", "init_tokens_from_name", "stop_when"))
    manifest = json.loads((tmp_path / "runs" / "edit" / "manifest.json").read_text())
    assert {k: manifest["sampling"][k] for k in ("steps", "guidance", "strength", "edge_thickness")} == \
        {"steps": offline.steps, "guidance": offline.guidance, "strength": offline.strength,
         "edge_thickness": offline.edge_thickness}
    assert manifest["sampling"]["profile"]["profile"] == "offline"
