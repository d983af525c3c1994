"""The denoiser wrapper: diffusers' own scheduler formulas for every prediction type, and target -> x0 round
trips."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dedit_nb.denoiser import PREDICTION_TYPES, Denoiser

CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              clip_sample=False)


def tensors(seed: int, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
def test_x0_is_the_clean_estimate_of_diffusers_own_step(prediction_type, scheduler_class):
    scheduler = scheduler_class(**CONFIG, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    denoiser = Denoiser.from_scheduler(scheduler)
    noisy, pred = tensors(0)
    for t in scheduler.timesteps[[0, 4, 9]]:
        expected = scheduler.step(pred, t, noisy, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(denoiser.x0(noisy, pred, t), expected)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_training_target_is_what_diffusers_trains_towards(prediction_type):
    scheduler = DDPMScheduler(**CONFIG, prediction_type=prediction_type)
    clean, noise = tensors(1)
    t = torch.tensor([0, 250, 999])                          # one timestep per batch element
    expected = {"epsilon": noise, "sample": clean, "v_prediction": scheduler.get_velocity(clean, noise, t)}
    torch.testing.assert_close(Denoiser.from_scheduler(scheduler).target(clean, noise, t), expected[prediction_type])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_target_of_a_noised_sample_leads_back_to_it(prediction_type, dtype):
    scheduler = DDPMScheduler(**CONFIG, prediction_type=prediction_type)
    denoiser = Denoiser.from_scheduler(scheduler)
    clean, noise = (x.to(dtype) for x in tensors(2))
    t = torch.tensor([3, 480, 990])
    noisy = scheduler.add_noise(clean, noise, t)
    torch.testing.assert_close(denoiser.x0(noisy, denoiser.target(clean, noise, t), t), clean,
                               atol=1e-4, rtol=1e-4)


def test_fractional_timesteps_use_the_nearest_trained_one():
    denoiser = Denoiser.from_scheduler(DDPMScheduler(**CONFIG, prediction_type="v_prediction"))
    noisy, pred = tensors(3)
    assert torch.equal(denoiser.x0(noisy, pred, torch.tensor(499.6)), denoiser.x0(noisy, pred, 500))
    assert not torch.equal(denoiser.x0(noisy, pred, 499), denoiser.x0(noisy, pred, 500))


def test_an_unknown_prediction_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'v-prediction'.*epsilon"):
        Denoiser(DDPMScheduler(**CONFIG).alphas_cumprod, "v-prediction")
