"""The sampler: the same DDIM as before the rewrite, the region blend step by step, guidance direction,
schedulers by name that converge on an exact denoiser, seeds that reach every stochastic step."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dedit_nb import masks as M
from dedit_nb.images import rgb_to_tensor, tensor_to_rgb
from dedit_nb.models import load_model
from dedit_nb.sampler import (SCHEDULERS, LatentPreview, SamplingConfig, classifier_free_guidance, latent_regions,
                              make_scheduler, masked_sample)
from sampler_cases import REFERENCE, REFERENCE_FAMILIES, gradient_image, reference_case, run_recording_latents


@pytest.fixture
def sd(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["sd"]))


@pytest.fixture
def pixel_model(tiny_model_dirs):
    """The offline family's tiny model samples in pixel space (no VAE): latents are the image."""
    return load_model(str(tiny_model_dirs["offline"]))


def record_steps(model, *args, **kwargs):
    """masked_sample's images and, per step, (step, num_steps, timestep, latents) seen by the user hook."""
    steps = []

    def hook(state):
        steps.append(SimpleNamespace(step=state.step, num_steps=state.num_steps, timestep=state.timestep,
                                     latents=state.latents.clone(), preview=state.preview()))

    return masked_sample(model, *args, callback_on_step_end=hook, progress=False, **kwargs), steps


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_ddim_at_eta_0_matches_the_code_before_the_rewrite(tiny_model_dirs, family):
    model = load_model(str(tiny_model_dirs[family]))
    stored = np.load(REFERENCE)
    images, latents = run_recording_latents(model, masked_sample, *reference_case(model), progress=False)
    np.testing.assert_allclose(latents, stored[f"{family}_latents"], rtol=1e-4, atol=1e-5)
    assert np.abs(images.astype(int) - stored[f"{family}_images"]).max() <= 1


def test_latent_cells_take_the_most_changing_region_of_their_pixels():
    model = SimpleNamespace(vae_scale=4, device=torch.device("cpu"))
    active = np.zeros((8, 12), bool)
    active[1, 2] = True                       # one pixel makes cell (0, 0) active
    soft = np.zeros_like(active)
    soft[0:2, 4:6] = True                     # part of cell (0, 1)
    soft[3, 3] = True                         # cell (0, 0) again: active wins
    soft[7, 11] = True                        # one pixel of cell (1, 2)
    hard, soft_cells = latent_regions(model, M.Regions(hard=~(active | soft), soft=soft, active=active))
    assert hard.tolist() == [[False, False, True], [True, True, False]]
    assert soft_cells.tolist() == [[False, True, False], [False, False, True]]


@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("strength, held", [(0.5, [True, True, False, False]), (0.25, [True, False, False, False]),
                                            (1.0, [True] * 4), (0.0, [False] * 4)])
def test_hard_cells_hold_the_noised_original_and_the_soft_band_only_for_the_strength_share(sd, strength, held,
                                                                                          scheduler_name):
    """Under every scheduler, noised as that scheduler noises (its own add_noise, in its own latent space)."""
    cond, labels, original, regions, _ = reference_case(sd)
    config = SamplingConfig(steps=4, guidance=3.0, strength=strength, edge_thickness=3, seed=5,
                            scheduler=scheduler_name)
    images, steps = record_steps(sd, cond, labels, original, regions, config)
    hard, soft = latent_regions(sd, regions)
    active = ~(hard | soft)
    assert hard.any() and soft.any() and active.any()
    scheduler = make_scheduler(sd, scheduler_name)
    scheduler.set_timesteps(4)
    noise = torch.randn((1, 4, *labels.shape), generator=torch.Generator().manual_seed(5))
    clean = sd.encode_images(rgb_to_tensor(original))
    assert [s.step for s in steps] == [0, 1, 2, 3] and {s.num_steps for s in steps} == {4}
    for s in steps:
        nxt = scheduler.timesteps[s.step + 1:s.step + 2]
        reference = scheduler.add_noise(clean, noise, nxt) if len(nxt) else clean
        same = s.latents[0] == reference[0]                                   # (C, h, w)
        assert same[:, hard].all(), s.step
        assert bool(same[:, soft].all()) == held[s.step], s.step
        assert not same[:, soft].any() or held[s.step], s.step
        assert not same[:, active].any(), s.step
    assert steps[-1].timestep == scheduler.timesteps[-1]
    assert np.array_equal(images[0][regions.hard], original[regions.hard])


def test_soft_pixels_are_exactly_the_originals_at_strength_1_in_pixel_space(pixel_model):
    cond, labels, original, regions, _ = reference_case(pixel_model)
    assert pixel_model.vae_scale == 1 and regions.soft.any()
    held = masked_sample(pixel_model, cond, labels, original, regions,
                         SamplingConfig(steps=4, guidance=3.0, strength=1.0, edge_thickness=3, seed=2),
                         progress=False)[0]
    assert np.array_equal(held[regions.soft], original[regions.soft])
    assert not np.array_equal(held[regions.active], original[regions.active])
    free = masked_sample(pixel_model, cond, labels, original, regions,
                         SamplingConfig(steps=4, guidance=3.0, strength=0.5, edge_thickness=3, seed=2),
                         progress=False)[0]
    assert not np.array_equal(free[regions.soft], original[regions.soft])


def test_guidance_wrapper_moves_from_the_unconditional_towards_the_conditional_prediction():
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    calls = []

    def both(latents, t):
        calls.append(latents.shape[0])
        return torch.cat([cond, uncond])

    latents = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(classifier_free_guidance(both, 1.0)(latents, 0), cond)
    assert torch.allclose(classifier_free_guidance(both, 0.0)(latents, 0), uncond)
    assert torch.allclose(classifier_free_guidance(both, 4.0)(latents, 0), uncond + 4.0 * (cond - uncond))
    assert calls == [4, 4, 4]                 # one call over both halves


def exact_denoiser(model, target, conditional_only=False):
    """Make ``model.predict`` return the exact noise of ``model_in`` towards ``target`` (pixel space); with
    ``conditional_only`` the unconditional branch (one prompt span) predicts towards ``-target`` instead.
    Returns the list the inputs' standard deviations are appended to."""
    alphas = make_scheduler(model).alphas_cumprod
    input_std = []

    def predict(latents, t, states, layout, pooled=None):
        input_std.append(float(latents.std()))
        a = alphas[int(t)]
        goal = target.expand_as(latents).clone()
        if conditional_only:
            for b, spans in enumerate(layout.spans):
                if len(spans) == 1:
                    goal[b] = -target[0]
        return (latents - a.sqrt() * goal) / (1 - a).sqrt()

    model.predict = predict
    return input_std


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler", "EulerAncestralDiscreteScheduler"])
def test_every_scheduler_lands_on_the_image_an_exact_denoiser_points_to(pixel_model, scheduler):
    target_image = gradient_image(32, 48)
    target = rgb_to_tensor(target_image)
    input_std = exact_denoiser(pixel_model, target)
    cond, labels, original, _, _ = reference_case(pixel_model)
    everything = M.edit_regions(np.ones(labels.shape, bool), 0)
    estimates = []
    image = masked_sample(pixel_model, cond, labels, np.zeros_like(original), everything,
                          SamplingConfig(steps=8, guidance=1.0, scheduler=scheduler, seed=1), progress=False,
                          callback_on_step_end=lambda step: estimates.append(step.denoised))[0]
    error = np.abs(image.astype(int) - target_image)
    assert error.mean() <= 4 and error.max() <= 24      # DDIM ends at alpha_cumprod[0] < 1: a trace of noise
    assert len(estimates) == 8 and all(torch.allclose(x0, target, atol=1e-3) for x0 in estimates)   # x0 each step
    assert all(0.3 < std < 1.5 for std in input_std), input_std    # the UNet sees variance-preserving inputs


def test_guidance_pushes_towards_the_conditional_branch(pixel_model):
    target_image = gradient_image(32, 48)
    target = rgb_to_tensor(target_image)
    exact_denoiser(pixel_model, target, conditional_only=True)   # unconditional: the negative image
    cond, labels, original, _, _ = reference_case(pixel_model)
    everything = M.edit_regions(np.ones(labels.shape, bool), 0)
    half = masked_sample(pixel_model, cond, labels, original, everything,
                         SamplingConfig(steps=8, guidance=1.5, scheduler="dpm++"), progress=False)[0]
    expected = ((2 * target).clamp(-1, 1) + 1) * 127.5     # -target + 1.5 (target - (-target)) = 2 target
    assert np.abs(half.astype(float) - expected[0].permute(1, 2, 0).numpy()).mean() <= 4


def test_eta_noise_comes_from_the_seed_of_each_image(sd):
    cond, labels, original, regions, _ = reference_case(sd)
    config = dict(steps=4, guidance=3.0, eta=1.0)

    def final_latents(seed, num_images):
        torch.manual_seed(seed * 97 + num_images)     # the global generator must not matter
        _, steps = record_steps(sd, cond, labels, original, regions,
                                SamplingConfig(seed=seed, num_images=num_images, **config))
        return steps[-1].latents

    first, again = final_latents(3, 2), final_latents(3, 2)
    assert torch.equal(first, again)
    assert torch.allclose(first[1], final_latents(4, 1)[0], atol=1e-4)     # image j is seed + j on its own
    deterministic = record_steps(sd, cond, labels, original, regions, SamplingConfig(seed=3, steps=4, guidance=3.0))
    assert not torch.allclose(first[0], deterministic[1][-1].latents[0], atol=1e-3)   # eta > 0 draws noise


def test_preview_is_a_small_rgb_image_per_sample_and_tracks_the_estimate(sd, pixel_model):
    cond, labels, original, regions, _ = reference_case(sd)
    _, steps = record_steps(sd, cond, labels, original, regions, SamplingConfig(steps=3, guidance=3.0, num_images=2))
    assert all(len(s.preview) == 2 for s in steps)
    assert {p.shape for s in steps for p in s.preview} == {(16, 24, 3)} and steps[0].preview[0].dtype == np.uint8
    cond, labels, original, regions, _ = reference_case(pixel_model)
    images, steps = record_steps(pixel_model, cond, labels, original, regions,
                                 SamplingConfig(steps=3, guidance=3.0, strength=1.0))
    assert np.abs(steps[-1].preview[0].astype(int) - images[0]).mean() <= 4    # pixel space: x0 is the image


def test_scheduler_names_and_their_settings_are_checked():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm-solver'"):
        SamplingConfig(scheduler="dpm-solver")
    with pytest.raises(ValueError, match="unknown scheduler"):
        SamplingConfig(scheduler="AutoencoderKL")
    assert SamplingConfig(scheduler="PNDMScheduler").scheduler == "PNDMScheduler"
    with pytest.raises(ValueError, match="SamplingConfig.eta: should be a number between 0 and 1"):
        SamplingConfig(eta=-1)


def test_eta_with_a_scheduler_without_it_is_refused(sd):
    cond, labels, original, regions, _ = reference_case(sd)
    with pytest.raises(ValueError, match="eta=0.5 has no meaning for DPMSolverMultistepScheduler"):
        masked_sample(sd, cond, labels, original, regions, SamplingConfig(steps=2, eta=0.5, scheduler="dpm++"),
                      progress=False)


def region_noise_levels(model, scheduler):
    """Sample the pixel model, whose exact denoiser points at the (flat grey) original itself, in 6 steps of
    ``scheduler`` at strength 1 (the soft band held at every step); per step but the last, the standard
    deviation of the latents over the hard, soft and active regions. The active region follows the scheduler's
    own trajectory, so it has the scheduler's noise level."""
    cond, labels, _, regions, _ = reference_case(model)
    original = np.full((*labels.shape, 3), 128, np.uint8)
    exact_denoiser(model, rgb_to_tensor(original))
    levels = []

    def measure(step):
        if step.step + 1 < step.num_steps:
            levels.append({r: float(step.latents[0][:, getattr(regions, r)].std())
                           for r in ("hard", "soft", "active")})

    image = masked_sample(model, cond, labels, original, regions,
                          SamplingConfig(steps=6, guidance=1.0, strength=1.0, edge_thickness=3, scheduler=scheduler,
                                         seed=4),
                          progress=False, callback_on_step_end=measure)[0]
    return levels, image, original, regions


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_held_regions_carry_the_noise_level_of_the_schedulers_own_trajectory(pixel_model, scheduler):
    """Euler-type schedulers sample in sigma space (init_noise_sigma ~ 15, scaled model input): a blend that
    noised the original on another scale would leave the hard region far noisier or cleaner than the rest."""
    levels, image, original, regions = region_noise_levels(pixel_model, scheduler)
    assert len(levels) == 5
    for i, level in enumerate(levels):
        for region in ("hard", "soft"):
            assert 0.9 < level[region] / level["active"] < 1.1, (i, region, level)
    assert levels[0]["active"] > 2 * levels[-1]["active"]           # the level falls as sampling goes on
    assert np.array_equal(image[~regions.active], original[~regions.active])


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])      # x0 from the scheduler's step, and estimated
def test_the_live_preview_shows_the_clean_estimate_not_the_noisy_latents(sd, pixel_model, scheduler):
    """With an exact denoiser the x0 estimate is the target at every step, while the latents are noise."""
    cond, labels, original, _, _ = reference_case(pixel_model)
    target_image = gradient_image(*labels.shape)
    exact_denoiser(pixel_model, rgb_to_tensor(target_image))
    everything = M.edit_regions(np.ones(labels.shape, bool), 0)
    _, steps = record_steps(pixel_model, cond, labels, np.zeros_like(original), everything,
                            SamplingConfig(steps=4, guidance=1.0, scheduler=scheduler))
    for s in steps:
        assert np.abs(s.preview[0].astype(int) - target_image).mean() <= 2, s.step
    noisy = tensor_to_rgb(steps[0].latents)[0]
    assert np.abs(noisy.astype(int) - target_image).mean() > 30              # what a latents preview would show

    cond, labels, original, _, _ = reference_case(sd)
    clean = sd.encode_images(rgb_to_tensor(original))
    exact_denoiser(sd, clean)
    everything = M.edit_regions(np.ones(original.shape[:2], bool), 0)
    seen = []
    masked_sample(sd, cond, labels, original, everything, SamplingConfig(steps=4, guidance=1.0, scheduler=scheduler),
                  progress=False,
                  callback_on_step_end=lambda s: seen.append((s.preview()[0], s.preview(decode=True)[0],
                                                              s.latents.clone())))
    fitted = LatentPreview(sd, original)
    expected, decoded = fitted(clean)[0], tensor_to_rgb(sd.decode_latents(clean))[0]
    for preview, full, _ in seen:
        assert preview.shape == (*labels.shape, 3) and np.abs(preview.astype(int) - expected).mean() <= 1
        assert full.shape == original.shape and np.abs(full.astype(int) - decoded).mean() <= 1
    assert np.abs(fitted(seen[0][2])[0].astype(int) - expected).mean() > 10
