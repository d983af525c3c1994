"""Train the offline demo model on procedural scenes (a one-off, run in the background; never in CI).

    python -m dedit_nb.offline.train --minutes 60            # trains, resumes from runs/offline-train
    python -m dedit_nb.offline.train --export-only           # writes the EMA weights into the package

A pixel-space UNet2DConditionModel with cross-attention conditioned on the frozen MiniLM encoder
(384-dim token states), v-prediction with a cosine schedule, AdamW along ``SCHEDULE``'s learning-rate legs,
EMA, 10% empty captions. Part of every batch is trained the way D-Edit samples: each object's pixels on its
own phrase ("a red circle"), the background on its own ("a yellow background"), through the engine's grouped
cross-attention, so the model is fluent in grouped prompts. Scenes and noise of step ``s`` come from
``(seed, s)``, so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention import ItemLayout, install_grouped_attention
from ..finetune import flatten_optimizer_state, restore_optimizer_state
from ..models import MINILM_SOURCE, OFFLINE_MODEL_DIR, TextConditioner, _minilm_slot
from ..session import atomic_write_bytes
from .scenes import random_scene

TEXT_LENGTH = 24          # every prompt is padded to this many MiniLM tokens, in training and in use
RESOLUTION = 32


def unet_config(resolution: int = RESOLUTION) -> dict:
    return dict(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(16, 32, 64), norm_num_groups=8, attention_head_dim=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=384)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


class PhraseCache:
    """MiniLM states of prompts, computed once per distinct string."""

    def __init__(self, text: TextConditioner):
        self.text, self.cache = text, {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            states, _ = self.text.encode(missing, TEXT_LENGTH)
            for p, s in zip(missing, states):
                self.cache[p] = s
        if len(self.cache) > 200_000:
            self.cache.clear()
        return [self.cache[p] for p in prompts]


def make_batch(step: int, seed: int, size: int, batch: int, grouped_share: float, phrases: PhraseCache):
    rng = np.random.default_rng([seed, step])
    scenes = [random_scene(rng, size) for _ in range(batch)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    states, spans, labels = [], [], []
    for s in scenes:
        if rng.random() < grouped_share:
            pieces = phrases(s.item_phrases)
            states.append(torch.cat(pieces))
            spans.append([(k * TEXT_LENGTH, (k + 1) * TEXT_LENGTH) for k in range(len(pieces))])
            labels.append(torch.from_numpy(s.labels).long())
        else:
            caption = "" if rng.random() < 0.1 else s.caption
            states.append(phrases([caption])[0])
            spans.append([(0, TEXT_LENGTH)])
            labels.append(torch.zeros(size, size, dtype=torch.long))
    longest = max(x.shape[0] for x in states)
    states = torch.stack([F.pad(x, (0, 0, 0, longest - x.shape[0])) for x in states])
    return images, states, ItemLayout(torch.stack(labels), spans)


@dataclass(frozen=True)
class Leg:
    """One leg of the learning-rate schedule: it ends at step ``end`` (exclusive). The rate warms up linearly from
    ``FINAL_SHARE * peak`` to ``peak`` over ``warmup_steps``, stays there, then decays (cosine) back to it over the
    leg's last ``decay_steps``."""

    end: int
    peak: float
    decay_steps: int
    warmup_steps: int = 0


FINAL_SHARE = 0.02
# The committed run. Its first leg sharpened the shapes with one decay; the later ones restart warm at lower
# rates for more steps and decay again. Legs only ever get appended, so the steps already taken (and the
# committed weights) stay a prefix of the run.
SCHEDULE = (Leg(10_500, 1e-3, 5_000), Leg(15_500, 5e-4, 4_700, warmup_steps=300),
            Leg(19_000, 3e-4, 3_300, warmup_steps=200))


def learning_rate(step: int, schedule: tuple[Leg, ...] = SCHEDULE) -> float:
    """The learning rate at ``step`` of a run made of ``schedule``'s legs."""
    start = 0
    for leg in schedule:
        if step < leg.end:
            break
        start = leg.end
    else:
        raise ValueError(f"step {step} is past the schedule's last leg (step {schedule[-1].end})")
    low = FINAL_SHARE * leg.peak
    into = step - start
    if into < leg.warmup_steps:
        return low + (leg.peak - low) * (into + 1) / leg.warmup_steps
    decay_start = leg.end - leg.decay_steps
    if step < decay_start:
        return leg.peak
    progress = (step - decay_start) / max(leg.decay_steps, 1)
    return low + (leg.peak - low) * 0.5 * (1 + np.cos(np.pi * progress))


def _state_dicts(unet, ema, opt) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    out.update({f"opt.{k}": v for k, v in flatten_optimizer_state(opt).items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_checkpoint(folder: Path, step: int, unet, ema, opt, losses: list[float]) -> None:
    from safetensors.torch import save
    atomic_write_bytes(folder / "state.safetensors", save(_state_dicts(unet, ema, opt)))
    atomic_write_bytes(folder / "state.json", json.dumps({"step": step, "loss": losses}).encode())


def load_checkpoint(folder: Path, unet, ema, opt) -> tuple[int, list[float]]:
    from safetensors.torch import load_file
    if not (folder / "state.json").exists():
        return 0, []
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    restore_optimizer_state(opt, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")})
    return meta["step"], meta["loss"]


def export(folder: Path, target: Path = OFFLINE_MODEL_DIR, resolution: int = RESOLUTION) -> Path:
    """Write the EMA weights as a diffusers model folder that ``load_model("offline")`` reads."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    tensors = load_file(str(folder / "state.safetensors"))
    unet = UNet2DConditionModel(**unet_config(resolution))
    unet.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    unet.save_pretrained(target / "unet", safe_serialization=True)
    DDIMScheduler(**scheduler_config()).save_pretrained(target / "scheduler")
    meta = json.loads((folder / "state.json").read_text())
    index = {"_class_name": "DEditOfflinePipeline", "_diffusers_version": "0.30.0", "_dedit_family": "offline",
             "_dedit_text_encoder": MINILM_SOURCE, "_dedit_text_length": TEXT_LENGTH,
             "_dedit_resolution": resolution, "_dedit_training_steps": meta["step"],
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    atomic_write_bytes(target / "model_index.json", json.dumps(index, indent=2).encode())
    return target


def train(folder: Path, minutes: float, schedule: tuple[Leg, ...] = SCHEDULE, batch: int = 32, seed: int = 0,
          grouped_share: float = 0.5, ema_decay: float = 0.999, checkpoint_every: int = 100,
          resolution: int = RESOLUTION, stop_at: int | None = None) -> int:
    """Train along ``schedule`` from the last checkpoint in ``folder``; return the step reached.

    The run stops early, with a checkpoint, after ``minutes`` or at step ``stop_at``; calling again resumes.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    max_steps = schedule[-1].end
    last = max_steps if stop_at is None else min(stop_at, max_steps)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(resolution))
    install_grouped_attention(unet)
    ema = UNet2DConditionModel(**unet_config(resolution))
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=learning_rate(0, schedule), weight_decay=1e-4)
    start, losses = load_checkpoint(folder, unet, ema, opt)
    text = TextConditioner([_minilm_slot(torch.float32)])
    text.slots[0].encoder.eval()
    phrases = PhraseCache(text)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    print(f"offline model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
          f"{resolution}x{resolution}, starting at step {start}", flush=True)
    deadline = time.time() + minutes * 60
    bar = tqdm(range(start, last), initial=start, total=max_steps, desc="training", mininterval=30)
    reached = start
    # the next batch is made on a worker thread while the UNet trains on this one; a batch depends only on
    # (seed, step), so the run is the same as making them in line
    pool = ThreadPoolExecutor(max_workers=1)
    upcoming = pool.submit(make_batch, start, seed, resolution, batch, grouped_share, phrases)
    for step in bar:
        images, states, layout = upcoming.result()
        upcoming = pool.submit(make_batch, step + 1, seed, resolution, batch, grouped_share, phrases)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, schedule)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        noise = torch.randn(images.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(images, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=states, cross_attention_kwargs={"item_layout": layout}).sample
        loss = F.mse_loss(pred, noise_scheduler.get_velocity(images, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        reached = step + 1
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}",
                        refresh=False)
        interrupted = time.time() > deadline
        if reached % checkpoint_every == 0 or interrupted or reached == last:
            save_checkpoint(folder, reached, unet, ema, opt, losses)
        if interrupted:
            break
    pool.shutdown(cancel_futures=True)
    return reached


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the offline demo model")
    parser.add_argument("--folder", type=Path, default=Path("runs/offline-train"))
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=SCHEDULE[-1].end,
                        help="stop at this step of the committed schedule (default: its end)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.export_only:
        if not 0 < args.steps <= SCHEDULE[-1].end:
            parser.error(f"--steps must be between 1 and {SCHEDULE[-1].end}, the end of the committed schedule")
        steps = train(args.folder, args.minutes, batch=args.batch, seed=args.seed, stop_at=args.steps)
        print(f"trained to step {steps}", flush=True)
    print(f"exported to {export(args.folder)}", flush=True)


if __name__ == "__main__":
    main()
