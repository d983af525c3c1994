"""Model profiles: the settings that depend on the model, in one place.

A profile holds a model family's working size (short side and multiple), finetune schedule, learning rates
(LoRA too) and batch, and its sampling steps, guidance, strength and soft band. The notebooks' parameters
that a profile sets default to ``None`` ("the profile's value"); :func:`resolve` fills them in, keeps every
explicit value, and says where each came from. ``FinetuneConfig`` and ``SamplingConfig`` default to the
Stable Diffusion 1.x profile and take any model's with ``for_model``.

The profile is chosen from the model: its family (offline, SD, SDXL), for SD whether it is 2.x (linear
projections, 1024-wide text states), and its prediction type; the working size is the UNet's sample size
times the VAE's downscale (512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL, 32 for the offline model). A hub
id whose configs cannot be read (offline, not cached) is recognised by its name.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import DEditModel


@dataclass(frozen=True)
class Profile:
    """What a model family needs. SD numbers: the reference code (lr 1e-4 then 5e-5, 500 + 500 steps, LoRA lr
    1e-4, 50 DDIM steps, strength 0.5, a 10-20 px soft band, guidance 2-7); the offline model's: what its
    notebooks were tuned with on its 32 px scenes."""

    name: str
    title: str
    resolution: int          # short side of the working size, in pixels
    multiple: int            # working sides are multiples of this (the latent factor or a multiple of it)
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    lora_lr: float
    batch_size: int
    steps: int               # sampling steps
    guidance: float
    strength: float
    edge_thickness: int      # soft band in pixels: the same share of the image at every profile's size
    example: str             # the bundled image the notebooks start from (dedit_nb/examples)
    # how the finetune learns and stops (dedit_nb.finetune.FinetuneConfig); the SD values are the reference's
    # plain schedule: every timestep weighs the same, random token rows, a constant rate, a fixed step count
    min_snr_gamma: float = 0.0        # Min-SNR-gamma loss weighting; 0: off
    init_tokens_from_name: bool = False   # item tokens start from the mean embedding of the item name's words
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"     # or "cosine" (to 0 at the stage's step limit)
    stop_when: str = "steps"          # or "plateau": a stage ends when its validation loss stops improving
    validate_every: int = 0           # steps between validation losses (fixed noise and timesteps); 0: none
    #                                   (at batch 1 one costs about 1.3 steps: every 100 steps adds about 1.3%)
    patience: int = 3                 # validations without improvement before a plateau stop
    min_delta: float = 0.01           # an improvement: the validation loss falls by this share of its best


EXAMPLES = Path(__file__).resolve().parent / "examples"   # package data: there wherever the package is installed
SETTINGS = tuple(f.name for f in fields(Profile) if f.name not in ("name", "title", "example"))

_SD = dict(multiple=8, stage1_steps=500, stage2_steps=500, stage1_lr=1e-4, stage2_lr=5e-5, lora_lr=1e-4,
           batch_size=1, steps=50, guidance=5.0, strength=0.5, example="coffee.jpg")
PROFILES = {p.name: p for p in [
    Profile("offline", "the offline demo model", resolution=32, multiple=8, stage1_steps=200, stage2_steps=200,
            stage1_lr=5e-3, stage2_lr=5e-4, lora_lr=1e-4, batch_size=4, steps=25, guidance=3.0, strength=0.5,
            edge_thickness=2, example="scene_a.png", validate_every=10),
    Profile("sd1", "Stable Diffusion 1.x", resolution=512, edge_thickness=10, **_SD),
    Profile("sd2", "Stable Diffusion 2.x (512, epsilon)", resolution=512, edge_thickness=10, **_SD),
    Profile("sd2-v", "Stable Diffusion 2.x (768, v-prediction)", resolution=768, edge_thickness=15, **_SD),
    Profile("sdxl", "Stable Diffusion XL", resolution=1024, edge_thickness=20, **_SD),
]}
SD1 = PROFILES["sd1"]


@dataclass(frozen=True)
class ModelFacts:
    """What chooses a profile, read from a model's configs (or guessed from its name)."""

    family: str                       # 'offline', 'sd' or 'sdxl'
    sd2: bool = False
    prediction_type: str = "epsilon"
    resolution: int | None = None     # the UNet's sample size in pixels; None when unknown
    source: str = "from its config"

    def profile(self) -> Profile:
        if self.family in ("offline", "sdxl"):
            base = PROFILES[self.family]
        elif self.sd2 or self.prediction_type == "v_prediction":
            base = PROFILES["sd2-v" if self.prediction_type == "v_prediction" else "sd2"]
        else:
            base = SD1
        return base if self.resolution in (None, base.resolution) else replace(base, resolution=self.resolution)

    def describe(self) -> str:
        kind = {"offline": "offline", "sd": "SD 2.x" if self.sd2 else "SD 1.x", "sdxl": "SDXL"}[self.family]
        size = f" {self.resolution} px" if self.resolution else ""
        return f"{kind} {self.prediction_type}{size}, {self.source}"


def model_facts(model: str | os.PathLike | DEditModel) -> ModelFacts:
    """The facts of a loaded :class:`~dedit_nb.models.DEditModel`, a local diffusers folder, a hub id (its
    cached configs, else its name) or ``"offline"``."""
    if not isinstance(model, (str, os.PathLike)):
        unet = model.unet.config
        return _facts(model.family, dict(unet), model.scheduler_config, model.vae_scale)
    from .models import OFFLINE_MODEL_DIR, cached_snapshot
    name = str(model)
    folder = OFFLINE_MODEL_DIR if name == "offline" else Path(name).expanduser()
    if not folder.is_dir():
        folder = cached_snapshot(name)
    if folder is None or not (folder / "model_index.json").is_file():
        return _facts_from_name(name)
    from .models import model_family
    index = _read(folder / "model_index.json")
    vae = _read(folder / "vae" / "config.json") if index.get("vae") else {}
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 1
    return _facts(model_family(index), _read(folder / "unet" / "config.json"),
                  _read(folder / "scheduler" / "scheduler_config.json"), scale)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _facts(family: str, unet: dict, scheduler: dict, vae_scale: int) -> ModelFacts:
    sample = unet.get("sample_size")
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    sd2 = family == "sd" and (bool(unet.get("use_linear_projection")) or unet.get("cross_attention_dim") == 1024)
    return ModelFacts(family, sd2, scheduler.get("prediction_type", "epsilon"),
                      int(sample) * vae_scale if sample else None)


def _facts_from_name(name: str) -> ModelFacts:
    """A hub id whose configs are out of reach: its family from its name (SD 2.x at 768 predicts v, its
    "-base" checkpoints at 512 predict noise)."""
    lower = name.lower()
    source = "guessed from its name (its configs are not on this machine)"
    if "xl" in lower:
        return ModelFacts("sdxl", source=source)
    if "stable-diffusion-2" in lower or "sd2" in lower or "sd-2" in lower:
        base = "base" in lower
        return ModelFacts("sd", True, "epsilon" if base else "v_prediction", 512 if base else 768, source)
    return ModelFacts("sd", source=source)


@dataclass(frozen=True)
class Resolved:
    """Settings with every ``None`` replaced by the profile's value, and where each value came from."""

    profile: str
    chosen_by: str
    values: dict
    sources: dict            # name -> 'profile' | 'parameter'

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v!r} [{self.sources[k]}]" for k, v in self.values.items())
        return f"model profile {self.profile!r} ({self.chosen_by}): {shown}"

    def record(self) -> dict:
        """What sessions and manifests keep: the profile, why it was chosen, and each value's source."""
        return asdict(self)


def resolve(model: str | os.PathLike | DEditModel, given: dict, settings: dict[str, str] | None = None) -> Resolved:
    """``given`` values (a name to a value or None) with each None replaced by the model profile's setting:
    ``settings`` maps a name to the profile setting it stands for (by default the same name)."""
    facts = model_facts(model)
    profile = facts.profile()
    settings = settings or {name: name for name in given}
    unknown = sorted(set(settings.values()) - set(SETTINGS))
    if unknown:
        raise KeyError(f"{unknown} are not profile settings; they are {list(SETTINGS)}")
    values = {n: getattr(profile, settings[n]) if v is None else v for n, v in given.items()}
    sources = {n: "profile" if v is None else "parameter" for n, v in given.items()}
    return Resolved(profile.name, facts.describe(), values, sources)


def example_image(model: str | os.PathLike | DEditModel) -> Path:
    """The bundled example image that suits the model (the synthetic scene for the offline model, a photo
    for Stable Diffusion), from any working directory."""
    return EXAMPLES / model_facts(model).profile().example
