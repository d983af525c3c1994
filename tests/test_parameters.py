"""Notebook parameters are checked by name, type and range before anything is loaded or written."""
import ast
import json
from pathlib import Path

import pytest

from dedit_nb.profiles import EXAMPLES
from dedit_nb.notebook import NOTEBOOK_PARAMETERS, ParameterError, check_parameters
from dedit_nb.segment import segment_session
from dedit_nb.session import Session
from dedit_nb.profiles import EXAMPLES

NB = Path(__file__).resolve().parents[1] / "notebooks"


def parameters_cell(name):
    nb = json.loads((NB / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(cell["source"])


def namespace(name, injected=""):
    """A kernel's globals after the parameters cell and papermill's injected cell ran (IPython's ``In``)."""
    ns = {"In": ["", parameters_cell(name)]}
    exec(parameters_cell(name), ns)
    if injected:
        ns["In"].append("# Parameters\n" + injected)
        exec(injected, ns)
    return ns


@pytest.mark.parametrize("name", list(NOTEBOOK_PARAMETERS))
def test_every_parameter_of_every_notebook_is_checked_and_its_default_passes(name):
    tree = ast.parse(parameters_cell(name))
    assigned = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    assert assigned == list(NOTEBOOK_PARAMETERS[name])
    check_parameters(name, namespace(name))


@pytest.mark.parametrize("injected, name, message", [
    ("steps = 1.5", "steps", "an integer >= 1 or None (the model profile's value), got 1.5"),
    ("guidance = 'high'", "guidance", "a number >= 0 or None (the model profile's value), got 'high'"),
    ("steps = '10'", "steps", "papermill's -r passes values as text; pass it with -p steps 10"),
    ("strength = 1.5", "strength", "between 0 and 1"),
    ("num_images = True", "num_images", "an integer >= 1, got True"),
    ("edit = 'recolour'", "edit", "is not one of"),
    ("strenght = 0.8", "strenght", "03_edit has no such parameter; did you mean 'strength'?"),
    ("item = 1.0", "item", "an item index or name"),
    ("scheduler = 'dpm'", "scheduler", "is not one of"),
])
def test_edit_parameters_fail_by_name(injected, name, message):
    with pytest.raises(ParameterError) as err:
        check_parameters("03_edit", namespace("03_edit", injected))
    assert err.value.name == name and message in str(err.value)


@pytest.mark.parametrize("injected, name", [("stage1_lr = 0", "stage1_lr"), ("batch_size = 0", "batch_size"),
                                            ("extra_sessions = '../runs/b'", "extra_sessions"),
                                            ("resume = 'yes'", "resume"), ("num_token = 3", "num_token")])
def test_finetune_parameters_fail_by_name(injected, name):
    with pytest.raises(ParameterError) as err:
        check_parameters("02_finetune", namespace("02_finetune", injected))
    assert err.value.name == name


def test_names_set_outside_papermills_cell_are_not_parameters():
    ns = namespace("03_edit", "steps = 3")
    ns["In"].append("sampling = dict(steps=steps)")
    exec(ns["In"][-1], ns)
    check_parameters("03_edit", ns)


def test_a_failed_segmentation_leaves_nothing_on_disk_so_the_rerun_works(tmp_path):
    """01's order: Session.create and segment_session with save=False, then save: a segmenter that fails
    (a broken checkpoint) leaves nothing on disk."""
    broken = tmp_path / "sam_vit_b.pth"
    broken.write_bytes(b"not a checkpoint")
    folder = tmp_path / "session"
    image = EXAMPLES / "scene_a.png"
    session = Session.create(folder, image, resolution=32, multiple=8, save=False)
    with pytest.raises(Exception):
        segment_session(session, 0, method="sam", save=False, checkpoint=str(broken))
    assert not folder.exists() or not any(folder.iterdir())
    session = Session.create(folder, image, resolution=32, multiple=8, save=False)
    partition = segment_session(session, 0, method="offline", save=False, num_items=3)
    session.save()
    assert len(Session.open(folder).images[0].items) == len(partition.item_names) == 3


def test_sampling_keywords_from_python_are_checked_by_name(tmp_path):
    from dedit_nb.notebook import check_edit_params
    s = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    assert check_edit_params(s, "recon", steps=3, eta=0.5).steps == 3
    with pytest.raises(ParameterError, match="parameter 'step': unknown parameter; did you mean 'steps'"):
        check_edit_params(s, "recon", step=3)
    with pytest.raises(ParameterError, match="parameter 'steps': should be an integer >= 1, got '10'"):
        check_edit_params(s, "recon", steps="10")


@pytest.mark.parametrize("name", list(NOTEBOOK_PARAMETERS))
def test_a_batch_run_of_any_notebook_passes_its_check_cell(name, tmp_path):
    from dedit_nb.batch import _run_settings
    settings = _run_settings(str(NB / f"{name}.ipynb"), tmp_path / "run-000")
    assert set(settings) <= set(NOTEBOOK_PARAMETERS[name])
    check_parameters(name, namespace(name, "".join(f"{k} = {v!r}\n" for k, v in settings.items())))


def test_a_grid_refuses_a_top_level_scheduler_before_running(tmp_path):
    from dedit_nb.batch import run_batch
    spec = {"notebook": str(NB / "03_edit.ipynb"), "output": str(tmp_path / "out"), "scheduler": "euler",
            "parameters": {}}
    with pytest.raises(ValueError, match="dask_scheduler"):
        run_batch(spec, tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_cli_sends_runs_to_a_dask_cluster_with_dask_scheduler_and_refuses_scheduler(tmp_path, monkeypatch,
                                                                                        capsys):
    from dedit_nb import batch
    calls = []
    monkeypatch.setattr(batch, "run_batch", lambda spec, base, workers, dask_scheduler, *a, **k: calls.append(
        dask_scheduler) or [])
    (tmp_path / "03_edit.ipynb").write_text("{}")
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebook: 03_edit.ipynb\noutput: out\ngrid: {seed: [1, 2]}\n")
    assert batch.main([str(grid), "--dask-scheduler", "tcp://host:8786"]) == 0
    assert calls == ["tcp://host:8786"]
    with pytest.raises(SystemExit):
        batch.main([str(grid), "--scheduler", "tcp://host:8786"])
    assert "--dask-scheduler" in capsys.readouterr().err and calls == ["tcp://host:8786"]


BOUNDED = [(notebook, name, check) for notebook, spec in NOTEBOOK_PARAMETERS.items() for name, check in spec.items()
           if check.low is not None or check.high is not None]


@pytest.mark.parametrize("notebook, name, check", BOUNDED, ids=[f"{nb}-{name}" for nb, name, _ in BOUNDED])
def test_each_documented_bound_itself_is_accepted_and_just_past_it_refused(notebook, name, check):
    """strength=1 is a documented maximum: refusing it is as wrong as accepting 1.01."""
    step = 1 if int in check.kinds and float not in check.kinds else 1e-6
    for bound, outside in ((check.low, -step), (check.high, step)):
        if bound is None:
            continue
        if bound == check.low and check.low_open:
            with pytest.raises(ParameterError):
                check_parameters(notebook, namespace(notebook, f"{name} = {bound!r}"))
        else:
            check_parameters(notebook, namespace(notebook, f"{name} = {bound!r}"))
        with pytest.raises(ParameterError) as err:
            check_parameters(notebook, namespace(notebook, f"{name} = {bound + outside!r}"))
        assert err.value.name == name


def test_the_maximums_strength_1_and_eta_1_pass_the_notebook_check_and_the_api(tmp_path):
    from dedit_nb.notebook import check_edit_params
    from dedit_nb.sampler import SamplingConfig
    assert ("03_edit", "strength") in {(nb, name) for nb, name, check in BOUNDED if check.high == 1}
    s = Session.create(tmp_path / "s", EXAMPLES / "scene_a.png", resolution=32, multiple=8)
    lowest = dict(steps=1, guidance=0.0, edge_thickness=0, seed=0, num_images=1)
    config = check_edit_params(s, "recon", strength=1.0, eta=1.0, **lowest)
    assert (config.strength, config.eta, config.steps, config.edge_thickness) == (1.0, 1.0, 1, 0)
    assert check_edit_params(s, "recon", strength=0, eta=0).strength == 0
    for name, value in (("strength", 1.000001), ("eta", 1.000001), ("strength", -1e-6), ("eta", -1e-6)):
        with pytest.raises(ParameterError) as err:
            check_edit_params(s, "recon", **{name: value})
        assert err.value.name == name
    assert SamplingConfig(strength=1.0, eta=1.0, **lowest).strength == 1.0
    with pytest.raises(ValueError, match="SamplingConfig.strength: should be a number between 0 and 1"):
        SamplingConfig(strength=1.000001)


def test_a_grid_varies_edits_and_checks_every_run_by_the_schemas():
    from dedit_nb.batch import GridError, expand
    spec = {"parameters": {"edit": "add", "box": [0, 0, 4, 4], "prompt": "a hat"},
            "grid": {"edits": [[{"kind": "remove", "item": 1}], [{"kind": "move", "item": 1, "dx": 2}]]}}
    assert [s["edits"][0]["kind"] for s in expand(spec, "03_edit")] == ["remove", "move"]
    for bad, name in [({"edits": {"kind": "remove", "item": 1}}, "edits"), ({"edits": ["remove"]}, "edits"),
                      ({"edits": [{"kind": "remove", "itme": 1}]}, "itme"),
                      ({"edits": [{"kind": "move", "item": 1, "dx": "4"}]}, "dx"),
                      ({"edits": [{"kind": "recolour"}]}, "kind"), ({"box": [0, 0, 4]}, "box"),
                      ({"strength": 2}, "strength"), ({"edit": "add", "name": 3}, "name")]:
        with pytest.raises(GridError, match=f"parameter '{name}'"):
            expand({"parameters": bad}, "03_edit")


def test_segmenter_kwargs_refuses_what_the_segmentation_schema_refuses():
    from dedit_nb.notebook import segmenter_kwargs
    with pytest.raises(ParameterError, match=r"parameter 'segmenter': 'nope' is not one of"):
        segmenter_kwargs("nope")
    with pytest.raises(ParameterError, match=r"parameter 'num_items': should be an integer >= 1, got 0"):
        segmenter_kwargs("offline", 0)
    assert segmenter_kwargs("offline", 3) == {"num_items": 3}
