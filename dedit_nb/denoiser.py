"""The prediction-type math in one place, as k-diffusion's model wrappers keep it.

A discrete diffusion model of the diffusers kind sees ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (``a_t`` =
``alphas_cumprod[t]``) and predicts one of three things, its scheduler config's ``prediction_type``: the
noise (``"epsilon"``), the velocity ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0`` (``"v_prediction"``) or x0
itself (``"sample"``). :class:`Denoiser` turns a prediction into the clean estimate x0 (what the sampler
previews) and gives the quantity a model is trained to predict (what the finetune and the offline trainer
regress on), with the formulas of diffusers' schedulers (``step``'s ``pred_original_sample``,
``get_velocity``).
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Denoiser:
    """The prediction-type math of one noise schedule: ``alphas_cumprod`` (one value per training timestep)
    and the model's ``prediction_type``. Timesteps may be a number, a 0-d tensor or one per batch element;
    fractional ones (Euler's) are rounded to the nearest trained timestep."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r} in the scheduler config; diffusers "
                             f"models predict one of {PREDICTION_TYPES}")
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type

    @classmethod
    def from_scheduler(cls, scheduler) -> "Denoiser":
        """The math of a diffusers scheduler: its ``alphas_cumprod`` and its config's ``prediction_type``."""
        return cls(scheduler.alphas_cumprod, scheduler.config.get("prediction_type", "epsilon"))

    def _alpha(self, t, like: torch.Tensor) -> torch.Tensor:
        """``a_t`` in the dtype and on the device of ``like``, shaped to broadcast over its batch."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        index = (t.round() if t.is_floating_point() else t).long()
        alpha = self.alphas_cumprod[index].to(device=like.device, dtype=like.dtype)
        return alpha.reshape(alpha.shape + (1,) * (like.ndim - alpha.ndim))

    def x0(self, noisy: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
        """The clean estimate from the model's prediction ``pred`` for ``noisy`` (the variance-preserving
        ``x_t``, i.e. a scheduler's scaled model input) at timestep ``t``."""
        if self.prediction_type == "sample":
            return pred
        alpha = self._alpha(t, pred)
        if self.prediction_type == "v_prediction":
            return alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
        return (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the model should predict for ``clean`` noised with ``noise`` to timestep ``t``."""
        if self.prediction_type == "sample":
            return clean
        if self.prediction_type == "v_prediction":
            alpha = self._alpha(t, clean)
            return alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
        return noise
