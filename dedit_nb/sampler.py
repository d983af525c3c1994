"""Masked sampling with grouped prompts and three regions (hard, soft, active), as a plain scheduler loop.

The pieces, in the style of diffusers pipelines and k-diffusion:

- a *denoiser* ``predict(latents, t)``: the UNet with the items' grouped prompts (:func:`conditioned`),
  wrapped by :func:`classifier_free_guidance`;
- any diffusers scheduler, chosen by name (:func:`make_scheduler`; DDIM by default), stepped with one
  generator per image so every stochastic step is reproducible by seed;
- per-step callbacks ``fn(step) -> latents | None`` called after each scheduler step with a
  :class:`SamplingStep`: :class:`RegionBlend` blends the original latents, noised to the next step's level,
  back over the *hard* region, and over the *soft* band for the first ``strength`` share of the steps; a
  user's ``callback_on_step_end`` (live previews) comes after it.

After decoding, hard-region pixels are copied from the original image, so they are exactly the original's
(the reference leaves the VAE round-trip error there).
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import conditioning as C
from . import masks as M
from .images import rgb_to_tensor, tensor_to_rgb
from .parameters import MAX_SEED, SAMPLING, SCHEDULERS, ParameterError
from .profiles import SD1, resolve


@dataclass
class SamplingConfig:
    """steps: scheduler steps; guidance: classifier-free guidance scale (<= 1 disables the unconditional pass);
    strength: share of steps during which the soft band is held to the original; edge_thickness: soft band
    width in pixels; seed: image j uses seed + j; num_images: samples per edit; eta: DDIM noise (0 = DDIM);
    scheduler: a name of :data:`SCHEDULERS` or any diffusers scheduler class name. Defaults: the Stable
    Diffusion 1.x profile; :meth:`for_model` takes another model's. ``profile`` records how for_model chose
    the values (kept in every edit manifest)."""

    steps: int = SD1.steps
    guidance: float = SD1.guidance
    strength: float = SD1.strength
    edge_thickness: int = SD1.edge_thickness
    seed: int = 0
    num_images: int = 1
    eta: float = 0.0
    scheduler: str = "ddim"
    profile: dict | None = None

    @classmethod
    def for_model(cls, model, **settings) -> "SamplingConfig":
        """Settings for ``model`` (a loaded model, folder, hub id or "offline"): the steps, guidance, strength
        and soft band of its profile (:mod:`dedit_nb.profiles`) wherever ``settings`` leaves them out or None."""
        resolved = resolve(model, {f.name: settings.pop(f.name, None) for f in SAMPLING if f.profile})
        return cls(**resolved.values, **settings, profile=resolved.record())

    def __post_init__(self):
        SAMPLING.check(asdict(self), resolved=True)
        if self.seed > MAX_SEED - (self.num_images - 1):
            raise ParameterError("seed", f"should be at most {MAX_SEED - (self.num_images - 1)} with num_images="
                                 f"{self.num_images} (image j uses seed + j, and torch seeds are below 2**64), got "
                                 f"{self.seed}", SAMPLING.where)


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name (:data:`SCHEDULERS`) or a class name."""
    import diffusers
    cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)} or a diffusers scheduler "
                         f"class name such as 'PNDMScheduler'")
    return cls


def make_scheduler(model, name: str = "ddim"):
    """A fresh scheduler of the given kind, configured from the model's own scheduler config."""
    return scheduler_class(name).from_config(model.scheduler_config)


# --- denoisers -------------------------------------------------------------------------------------------
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conditioned(model, conds: Sequence[C.Conditioning], maps: Sequence[torch.Tensor]) -> Predict:
    """The UNet's prediction for a batch whose element j has the prompts ``conds[j]`` over the item map
    ``maps[j]`` (latent resolution)."""
    states, layout, pooled = C.batch(conds, maps)
    states = states.to(model.dtype)
    pooled = None if pooled is None else pooled.to(model.dtype)

    def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.predict(latents, t, states, layout, pooled)

    return predict


def classifier_free_guidance(predict: Predict, guidance: float) -> Predict:
    """Wrap a denoiser whose batch is the conditional half then the unconditional half: the latents run
    through both in one call, and the prediction moves from the unconditional one towards, and past, the
    conditional one by ``guidance``."""

    def guided(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond_pred, uncond_pred = predict(torch.cat([latents, latents]), t).chunk(2)
        return uncond_pred + guidance * (cond_pred - uncond_pred)

    return guided


# --- per-step state and callbacks ------------------------------------------------------------------------
@dataclass
class SamplingStep:
    """What a per-step callback sees after scheduler step ``step`` of ``num_steps``.

    latents: the latents going into the next step (after any earlier callback changed them);
    denoised: the current estimate of the clean latents (x0). :meth:`preview` turns it into RGB images.
    """

    step: int
    num_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    denoised: torch.Tensor
    model: object = None
    preview_map: "LatentPreview | None" = None

    def preview(self, decode: bool = False) -> list[np.ndarray]:
        """The current x0 estimate as uint8 RGB images at latent resolution, through a linear map from latent
        channels to RGB fitted on the original image (cheap); ``decode=True`` runs the VAE instead
        (full resolution, one decoder pass). Pixel-space models need neither."""
        if self.model.vae is None or decode or self.preview_map is None:
            return list(tensor_to_rgb(self.model.decode_latents(self.denoised)))
        return self.preview_map(self.denoised)


StepCallback = Callable[[SamplingStep], "torch.Tensor | None"]


class LatentPreview:
    """Latents -> approximate RGB by a linear map (with offset) from latent channels to colours, fitted by
    least squares on one image and its latents; fitted on first use."""

    def __init__(self, model, image: np.ndarray, latents: torch.Tensor | None = None):
        self.model, self.image, self.latents, self.weights = model, image, latents, None

    def _fit(self) -> torch.Tensor:
        latents = self.latents if self.latents is not None else self.model.encode_images(rgb_to_tensor(self.image))
        latents = latents[:1].float().cpu()
        c, h, w = latents.shape[1:]
        pixels = torch.nn.functional.adaptive_avg_pool2d(rgb_to_tensor(self.image).float(), (h, w))
        x = torch.cat([latents.reshape(c, -1).T, torch.ones(h * w, 1)], dim=1)
        return torch.linalg.lstsq(x, pixels.reshape(3, -1).T).solution

    def __call__(self, latents: torch.Tensor) -> list[np.ndarray]:
        if self.weights is None:
            self.weights = self._fit()
        b, c, h, w = latents.shape
        x = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, c)
        rgb = (torch.cat([x, torch.ones(len(x), 1)], dim=1) @ self.weights).reshape(b, h, w, 3)
        return list(tensor_to_rgb(rgb.permute(0, 3, 1, 2).clamp(-1, 1)))


class RegionBlend:
    """The per-step region blend: after step ``i`` the original latents, noised to the level of the next
    step (unnoised after the last), replace the latents over the hard region, and over the soft band too
    while ``i < strength * num_steps``."""

    def __init__(self, scheduler, original_latents: torch.Tensor, noise: torch.Tensor, hard: torch.Tensor,
                 soft: torch.Tensor, strength: float):
        self.scheduler, self.original, self.noise = scheduler, original_latents, noise
        self.hard, self.hard_or_soft = hard, hard | soft
        self.soft_steps = strength * len(scheduler.timesteps)

    def holds_soft(self, step: int) -> bool:
        return step < self.soft_steps

    def __call__(self, state: SamplingStep) -> torch.Tensor:
        timesteps = self.scheduler.timesteps
        if state.step + 1 < len(timesteps):
            reference = self.scheduler.add_noise(self.original, self.noise, timesteps[state.step + 1:state.step + 2])
        else:
            reference = self.original
        keep = self.hard_or_soft if self.holds_soft(state.step) else self.hard
        return torch.where(keep, reference.to(state.latents.dtype), state.latents)


# --- the loop --------------------------------------------------------------------------------------------
def _x0_estimate(scheduler, model_in: torch.Tensor, pred: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
    """x0 from a prediction, for schedulers whose step does not return it (``model_in`` is the scaled input,
    which has the variance-preserving form for every scheduler)."""
    if prediction_type == "sample":
        return pred
    alpha = scheduler.alphas_cumprod.to(pred.device)[int(round(float(t)))].to(pred.dtype)
    if prediction_type == "v_prediction":
        return alpha.sqrt() * model_in - (1 - alpha).sqrt() * pred
    return (model_in - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def step_kwargs(scheduler, generators: list[torch.Generator], eta: float) -> dict:
    """Keyword arguments for ``scheduler.step``: the generators (one per batch element) wherever the step
    draws noise, and ``eta`` for schedulers that have it."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta:
        raise ValueError(f"eta={eta} has no meaning for {type(scheduler).__name__}; use eta=0 or scheduler='ddim'")
    return kwargs


@torch.no_grad()
def denoise(model, predict: Predict, scheduler, latents: torch.Tensor, generators: list[torch.Generator],
            eta: float = 0.0, callbacks: Sequence[StepCallback] = (), preview_map: LatentPreview | None = None,
            progress: bool = True) -> torch.Tensor:
    """Run ``scheduler`` (timesteps already set) from ``latents`` with the denoiser ``predict``; after each
    step every callback sees a :class:`SamplingStep`, and one that returns a tensor replaces the latents."""
    extra = step_kwargs(scheduler, generators, eta)
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_in = scheduler.scale_model_input(latents, t)
        pred = predict(model_in, t)
        out = scheduler.step(pred, t, latents, **extra)
        latents = out.prev_sample
        denoised = getattr(out, "pred_original_sample", None)
        if denoised is None:
            denoised = _x0_estimate(scheduler, model_in, pred, t, model.prediction_type)
        state = SamplingStep(i, len(timesteps), t, latents, denoised, model, preview_map)
        for callback in callbacks:
            changed = callback(state)
            if changed is not None:
                latents = state.latents = changed
    return latents


def latent_regions(model, regions: M.Regions) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard and soft maps at latent resolution. A latent cell is active if any of its pixels is active,
    soft if any is soft (and none active), and hard only when all its pixels are hard."""
    f = model.vae_scale
    active = M.downsample_any(regions.active, f)
    soft = M.downsample_any(regions.soft, f) & ~active
    hard = ~(active | soft)
    to_t = lambda a: torch.as_tensor(a, device=model.device)  # noqa: E731
    return to_t(hard), to_t(soft)


@torch.no_grad()
def masked_sample(model, cond: C.Conditioning, labels: torch.Tensor, original: np.ndarray,
                  regions: M.Regions, config: SamplingConfig, progress: bool = True,
                  callback_on_step_end: StepCallback | None = None) -> list[np.ndarray]:
    """Generate ``config.num_images`` images for one image's item prompts and label map.

    cond: the items' prompts (``conditioning.encode_items``); labels: latent-resolution item map ``(h, w)``;
    original: the working image ``uint8 (H, W, 3)``; regions: pixel-level hard/soft/active maps;
    callback_on_step_end: called after every step (and after the region blend) with a :class:`SamplingStep`.
    Returns uint8 images whose hard-region pixels equal ``original``.
    """
    n = config.num_images
    scheduler = make_scheduler(model, config.scheduler)
    scheduler.set_timesteps(config.steps, device=model.device)
    trained = scheduler.config.num_train_timesteps
    if float(scheduler.timesteps.max()) >= trained:
        raise ValueError(f"steps={config.steps} is more than the {config.scheduler} scheduler of this model takes (its "
                         f"timesteps would reach {float(scheduler.timesteps.max()):g}; the model was trained on 0.."
                         f"{trained - 1}): use steps <= {trained - scheduler.config.get('steps_offset', 0)}")
    h, w = labels.shape
    generators = [torch.Generator().manual_seed(config.seed + j) for j in range(n)]
    noise = torch.cat([torch.randn((1, model.latent_channels, h, w), generator=g) for g in generators])
    noise = noise.to(device=model.device, dtype=model.dtype)
    latents = noise * scheduler.init_noise_sigma

    if config.guidance > 1.0:
        unconditional = [C.unconditional(model)] * n, [torch.zeros_like(labels)] * n
        predict = classifier_free_guidance(
            conditioned(model, [cond] * n + unconditional[0], [labels] * n + unconditional[1]), config.guidance)
    else:
        predict = conditioned(model, [cond] * n, [labels] * n)

    callbacks: list[StepCallback] = []
    original_latents = None
    freeze = bool((~regions.active).any())
    if freeze:
        original_latents = model.encode_images(rgb_to_tensor(original)).expand(n, -1, -1, -1)
        hard, soft = latent_regions(model, regions)
        callbacks.append(RegionBlend(scheduler, original_latents, noise, hard, soft, config.strength))
    if callback_on_step_end is not None:
        callbacks.append(callback_on_step_end)
    latents = denoise(model, predict, scheduler, latents, generators, config.eta, callbacks,
                      LatentPreview(model, original, original_latents), progress)

    images = tensor_to_rgb(model.decode_latents(latents))
    if freeze:
        images = paste_hard_region(images, original, regions.hard)
    return [img for img in images]


def paste_hard_region(images: np.ndarray, original: np.ndarray, hard: np.ndarray) -> np.ndarray:
    """``images`` (N, H, W, 3) with the ``original``'s pixels over the ``hard`` region: exactly the original's,
    where the latent blend alone leaves the VAE's round-trip error."""
    return np.where(hard[None, ..., None], original[None], images)
