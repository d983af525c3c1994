"""The model as D-Edit uses it: one object for every family (:class:`DEditModel`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention import ItemLayout, cross_attention_layers, install_grouped_attention, layers_ignoring_item_layout
from .delta import UNetDelta
from .text import TextConditioner

if TYPE_CHECKING:
    from ..session import Session


class DEditModel:
    """A diffusion model as D-Edit uses it: UNet with grouped attention, optional VAE, text conditioning."""

    def __init__(self, model_id: str, family: str, unet, scheduler_config: dict, conditioner: TextConditioner,
                 vae=None, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 zero_uncond: bool = False):
        self.model_id = model_id
        self.zero_uncond = zero_uncond
        self.family = family
        self.unet = unet
        self.vae = vae
        self.conditioner = conditioner
        self.scheduler_config = dict(scheduler_config)
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.delta = UNetDelta(unet)   # the learned UNet parameters in place, attention or LoRA mode
        install_grouped_attention(self.unet)
        self._cross_attention = cross_attention_layers(self.unet)   # checked at every grouped call: found once
        if self.vae is not None:
            self.vae.enable_slicing()   # decode a batch one image at a time: same output, a batch's peak / n
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def modules(self) -> list[torch.nn.Module]:
        mods = [self.unet] + [s.encoder for s in self.conditioner.slots]
        return mods + ([self.vae] if self.vae is not None else [])

    # --- geometry ------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_factor(self) -> int:
        """Image sides must be multiples of this (the VAE's downscale): the UNet takes any latent size, its
        coarser levels are ceil-sized (e.g. 40x25 -> 20x13 -> 10x7) and the item maps follow them."""
        return self.vae_scale

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    # --- pixels <-> latents --------------------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> latents (the distribution's mean, scaled)."""
        images = images.to(self.device)
        if self.vae is None:
            return images.to(self.dtype)
        dist = self.vae.encode(images.to(self._vae_dtype())).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((dist.mean - shift) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], fp32."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self._vae_dtype()) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().clamp(-1, 1)

    # --- denoiser ------------------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor | int, states: torch.Tensor,
                layout: ItemLayout | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call. ``states`` holds each element's item prompts end to end; ``layout`` groups them."""
        if layout is not None:
            ignoring = layers_ignoring_item_layout(self._cross_attention)
            if ignoring:
                raise RuntimeError(f"{len(ignoring)} cross-attention layers ({ignoring[0]}, ...) have a processor "
                                   "that ignores D-Edit's item layout (set_attn_processor or xformers replaced it); "
                                   "call dedit_nb.attention.install_grouped_attention(model.unet) after choosing "
                                   "an attention backend (self-attention layers keep theirs)")
        h, w = latents.shape[-2:]
        added = self.conditioner.added_cond_kwargs(pooled, h * self.vae_scale, w * self.vae_scale)
        kwargs = {"cross_attention_kwargs": {"item_layout": layout}}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return self.unet(latents, timestep, encoder_hidden_states=states, **kwargs).sample

    # --- sessions (the learned UNet delta's own operations are on self.delta) ------------------------
    def use_session(self, session: Session) -> None:
        """Put exactly this finetuned session's item tokens and UNet delta in place (every run calls it, so
        one loaded model serves many sessions: the delta is swapped only when another one is in place)."""
        self.conditioner.set_token_rows(session.load_weights("tokens"))
        self.delta.use_session(session)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def training_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.scheduler_config)

    def enable_vae_tiling(self) -> None:
        """Encode/decode in overlapping tiles of half the VAE's sample size (diffusers' VAE tiling): bounded
        memory, with blended tile seams. diffusers' own tiles are the sample size and tile only images
        *above* it, which leaves SDXL at exactly 1024x1024 untiled; images up to half the sample size are
        unchanged."""
        if self.vae is not None:
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = self.vae.config.sample_size // 2
            self.vae.tile_latent_min_size = self.vae.tile_sample_min_size // self.vae_scale

    def to(self, device=None, dtype=None) -> "DEditModel":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for m in self.modules():
            m.to(self.device)
        for m in [self.unet] + [s.encoder for s in self.conditioner.slots]:
            if next(m.parameters()).dtype != self.dtype:
                m.to(dtype=self.dtype)
        return self
