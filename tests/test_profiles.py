"""Model profiles: chosen from the model, one source for the defaults, explicit values win and are named;
models out of reach fail at once; 03's model check before loading."""
import json
import shutil
from dataclasses import asdict

import pytest

from dedit_nb import FinetuneConfig, SamplingConfig, Session, finetune, load_model
from dedit_nb.models import ModelLoadError
from dedit_nb.testing import build_tiny_model
from dedit_nb.notebook import ParameterError, check_session_model, resolve_parameters
from dedit_nb.segment import segment_session
from dedit_nb.profiles import EXAMPLES, PROFILES, SD1, example_image, model_facts, resolve


def test_the_profile_follows_the_models_configs_and_loaded_models_agree(tmp_path, tiny_model_dirs):
    sd2 = build_tiny_model("sd2", tmp_path / "sd2")
    expected = {tiny_model_dirs["sd"]: "sd1", sd2: "sd2-v", tiny_model_dirs["sdxl"]: "sdxl", "offline": "offline"}
    for model, name in expected.items():
        profile = model_facts(str(model)).profile()
        assert profile.name == name
        assert model_facts(load_model(str(model))).profile() == profile     # a folder and its loaded model agree
    # the working size is the UNet's sample size times the VAE's downscale: 32 x 2 for the tiny models
    assert model_facts(str(tiny_model_dirs["sd"])).profile().resolution == 64
    assert model_facts("offline").profile() == PROFILES["offline"]
    unet = json.loads((sd2 / "unet" / "config.json").read_text())
    (sd2 / "unet" / "config.json").write_text(json.dumps({**unet, "use_linear_projection": False}))
    assert model_facts(str(sd2)).profile().name == "sd2-v"                    # v-prediction alone says SD 2.x
    scheduler = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "epsilon"}))
    assert model_facts(str(sd2)).profile().name == "sd1"


@pytest.mark.parametrize("hub_id, name, resolution", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", 512),
    ("stabilityai/stable-diffusion-2-1", "sd2-v", 768),
    ("stabilityai/stable-diffusion-2-1-base", "sd2", 512),
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024),
])
def test_a_hub_id_without_its_configs_is_known_by_name(hub_id, name, resolution):
    resolved = resolve(hub_id, {"resolution": None, "multiple": None})
    assert resolved.profile == name and resolved.values == {"resolution": resolution, "multiple": 8}
    assert "guessed from its name" in resolved.chosen_by
    assert example_image(hub_id) == EXAMPLES / "coffee.jpg" and example_image("offline").is_file()


def test_explicit_values_win_and_every_value_names_its_source():
    resolved = resolve("offline", {"stage1_lr": None, "stage2_lr": 1e-3})
    assert resolved.values == {"stage1_lr": PROFILES["offline"].stage1_lr, "stage2_lr": 1e-3}
    assert resolved.sources == {"stage1_lr": "profile", "stage2_lr": "parameter"}
    assert str(resolved).startswith("model profile 'offline'") and "\n" not in str(resolved)
    assert "stage1_lr=0.005 [profile]" in str(resolved) and "stage2_lr=0.001 [parameter]" in str(resolved)
    config = FinetuneConfig.for_model("offline", stage2_lr=1e-3, lora=True)
    assert (config.stage1_lr, config.stage2_lr, config.batch_size, config.lora) == (5e-3, 1e-3, 4, True)
    assert config.profile["sources"]["stage2_lr"] == "parameter"
    sampling = SamplingConfig.for_model("stabilityai/stable-diffusion-xl-base-1.0", steps=7)
    assert (sampling.steps, sampling.edge_thickness, sampling.profile["profile"]) == (7, 20, "sdxl")
    # one source: the Python API's plain defaults are the SD 1.x profile's
    plain = asdict(FinetuneConfig())
    assert {k: plain[k] for k in ("stage1_steps", "stage2_steps", "stage1_lr", "stage2_lr", "lora_lr",
                                  "batch_size")} == {k: getattr(SD1, k) for k in ("stage1_steps", "stage2_steps",
                                                                                 "stage1_lr", "stage2_lr",
                                                                                 "lora_lr", "batch_size")}
    sd1 = SamplingConfig.for_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert {**asdict(sd1), "profile": None} == asdict(SamplingConfig())
    # a resumed finetune is not refused because the record of how its values were chosen differs
    assert FinetuneConfig.for_model("offline").resumable_with(FinetuneConfig(**{**asdict(config), "lora": False,
                                                                               "stage2_lr": 5e-4, "profile": None}))


def test_notebook_parameters_resolve_through_their_table():
    namespace = {"recon_steps": None, "recon_guidance": 4.5, "stage1_lr": None}
    resolved = resolve_parameters("02_finetune", "offline", namespace)
    assert resolved.values["recon_steps"] == PROFILES["offline"].steps             # recon_steps is the profile's steps
    assert resolved.values["recon_guidance"] == 4.5 and resolved.sources["recon_guidance"] == "parameter"
    assert resolved.values["batch_size"] == PROFILES["offline"].batch_size         # missing from the namespace: None


def test_a_hub_id_out_of_reach_fails_at_once_naming_a_local_folder(monkeypatch):
    import socket

    import huggingface_hub
    from diffusers import DiffusionPipeline

    def no_download(*args, **kwargs):
        raise AssertionError("the hub was asked (a 25 s wait) instead of failing at once")
    monkeypatch.setattr(DiffusionPipeline, "load_config", no_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        load_model("someone/not-cached-here")
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "local diffusers folder" in str(err.value)
    assert "save_pretrained" in str(err.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ModelLoadError, match="no connection to huggingface.co .*local diffusers folder"):
        load_model("someone/not-cached-here")
    with pytest.raises(ModelLoadError, match="is not a folder here, nor a Hugging Face hub id"):
        load_model("runs/models/sd-folder")


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_is_out_of_reach(tmp_path, tiny_model_dirs, monkeypatch):
    import huggingface_hub
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model_dirs["sd"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = load_model("someone/tiny-sd")
    assert model.model_id == "someone/tiny-sd" and model.family == "sd"
    assert model_facts("someone/tiny-sd").source == "from its config"           # cached configs, not the name


def test_sessions_and_manifests_record_the_profile_and_03_checks_the_model_before_loading(tmp_path,
                                                                                            tiny_model_dirs):
    sd = str(tiny_model_dirs["sd"])
    size = resolve_parameters("01_segment", sd, {"resolution": None, "multiple": 8})
    session = Session.create(tmp_path / "s", EXAMPLES / "coffee.jpg", resolution=size.values["resolution"],
                             multiple=size.values["multiple"], profile=size.record())
    segment_session(session, 0, num_items=2)
    assert Session.open(tmp_path / "s").profile == size.record()
    assert size.record()["sources"] == {"resolution": "profile", "multiple": "parameter"}
    with pytest.raises(ParameterError, match="parameter 'session_dir'.*run 02_finetune"):
        check_session_model(session, sd)
    model = load_model(sd)
    finetune(model, session, FinetuneConfig.for_model(model, stage1_steps=1, stage2_steps=1, num_tokens=1),
             progress=False)
    session = Session.open(tmp_path / "s")
    assert session.finetune_state["config"]["profile"]["profile"] == "sd1"
    check_session_model(session, sd)
    with pytest.raises(ParameterError) as err:
        check_session_model(session, "offline")
    assert err.value.name == "model" and f"model={sd!r}" in str(err.value)
    assert "Stable Diffusion 1.x" in str(err.value) and "the offline demo model" in str(err.value)
    from dedit_nb.edits import Editor
    sampling = SamplingConfig.for_model(model, steps=1)
    result = Editor(model, session, progress=False).reconstruct(0, **asdict(sampling))
    assert result.manifest["sampling"]["profile"] == sampling.profile
    assert Session.open(tmp_path / "s").history[-1]["sampling"]["profile"]["sources"]["steps"] == "parameter"
