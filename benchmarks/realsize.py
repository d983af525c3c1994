"""The README workflow at real size: SD 1.5 / SDXL architectures with random weights, in a chosen dtype.

    python benchmarks/realsize.py --family sd15 --dtype fp32 --device cpu --stage1-steps 2 --stage2-steps 2
    python benchmarks/realsize.py --family sdxl --dtype fp16 --device cuda --gradient-checkpointing

No download: the model folder is built from the published configs (UNet, VAE, CLIP text encoders; the
tokenizer is a byte-level stand-in that makes a token of every character, since no CLIP vocabulary can be
fetched here; the text encoders keep the real 49,408-row embedding tables) with random weights, saved with
``save_pretrained`` under ``runs/realsize/<family>`` once and reloaded through ``load_model`` as a user's
checkpoint would be. Then, as in the README: a session from ``dedit_nb/examples/coffee.jpg`` at the family's
resolution, offline segmentation into 6 items, the finetune (attention mode) interrupted in stage 1 and in
stage 2 and resumed, a LoRA finetune of a copy, and the recon / text / move / remove edits (hard pixels
checked exact). Every phase prints its wall time, its peak memory (RSS on CPU, sampled every 10 ms;
``torch.cuda.max_memory_allocated`` on CUDA) and the bytes it saved.

Last, the cost of a finetune step and of a sampling step against plain diffusers on the same UNet (stock
``AttnProcessor2_0`` everywhere, one 77-token prompt, the same q/k/v weights trained by AdamW; sampling:
the UNet call of a guided step, batch 2), alternating which runs first, ``--rounds`` rounds (CPU time on
CPU, synchronised wall time on CUDA). ``--phases`` runs a subset (SDXL in fp32 does not fit in 23 GB of RAM).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dedit_nb import conditioning as C  # noqa: E402
from dedit_nb.attention import ItemLayout  # noqa: E402
from dedit_nb.edits import Editor  # noqa: E402
from dedit_nb.profiles import EXAMPLES  # noqa: E402
from dedit_nb.finetune import FinetuneConfig, finetune  # noqa: E402
from dedit_nb.finetune.stopping import VALIDATION_TIMESTEPS  # noqa: E402
from dedit_nb.profiles import PROFILES  # noqa: E402
from dedit_nb.models import OFFLINE_MODEL_DIR, byte_level_clip_tokenizer, load_model  # noqa: E402
from dedit_nb.session import Session  # noqa: E402

PHASES = ("finetune", "lora", "edits", "ratios", "speedups")
RESOLUTION = {"sd15": 512, "sdxl": 1024}


# ---------------------------------------------------------------------------------------------------------
# Model folders from the published configs
# ---------------------------------------------------------------------------------------------------------

def _clip_l(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _clip_bigg():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config)


def build_folder(family: str, folder: Path) -> Path:
    """SD 1.5 or SDXL base, random weights, as a diffusers folder (built once, fp16 files like the hub's)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save = dict(safe_serialization=True)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    if family == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        AutoencoderKL(sample_size=512, scaling_factor=0.18215, **vae).half().save_pretrained(tmp / "vae", **save)
        _clip_l().half().save_pretrained(tmp / "text_encoder", **save)
        byte_level_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    else:
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        AutoencoderKL(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **vae
                      ).half().save_pretrained(tmp / "vae", **save)
        _clip_l().half().save_pretrained(tmp / "text_encoder", **save)
        _clip_bigg().half().save_pretrained(tmp / "text_encoder_2", **save)
        byte_level_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        byte_level_clip_tokenizer().save_pretrained(tmp / "tokenizer_2")
        EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               steps_offset=1, timestep_spacing="leading").save_pretrained(tmp / "scheduler")
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    unet.half().save_pretrained(tmp / "unet", **save)
    del unet
    import json
    index.update({"_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
                  "vae": ["diffusers", "AutoencoderKL"]})
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------

class Phase:
    """Wall time, peak memory and saved bytes of one phase."""

    rows: list[tuple[str, float, float, str]] = []

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.saved = ""

    def __enter__(self):
        self.start = time.perf_counter()
        self.peak = psutil.Process().memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while self.running:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else self.peak
        Phase.rows.append((self.name, wall, peak / 2 ** 30, self.saved))
        print(f"  {self.name}: {wall:.1f} s, peak {peak / 2 ** 30:.2f} GiB {self.saved}", flush=True)


def weight_files(session: Session) -> dict[str, int]:
    """Bytes of each saved weights file kind (tokens, unet, optimizer)."""
    sizes: dict[str, int] = {}
    for f in (session.folder / "weights").glob("*.safetensors"):
        kind = f.name.split("-")[0]
        sizes[kind] = sizes.get(kind, 0) + f.stat().st_size
    return sizes


def describe(sizes: dict[str, int], unet_bytes: int) -> str:
    return ", ".join(f"{k} {v / 2 ** 20:.2f} MiB ({100 * v / unet_bytes:.2f}% of the UNet)"
                     for k, v in sorted(sizes.items()))


def timer(device: torch.device):
    if device.type == "cuda":
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.process_time


# ---------------------------------------------------------------------------------------------------------
# Ratios against plain diffusers on the same UNet
# ---------------------------------------------------------------------------------------------------------

def _stock(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    return saved


def ratios(model, session: Session, config: FinetuneConfig, rounds: int, steps: int
           ) -> tuple[list[float], list[float]]:
    """Per round: (our finetune step / plain step, our sampling UNet call / plain call)."""
    unet, device, dtype = model.unet, model.device, model.dtype
    now = timer(device)
    entry = session.image(0)
    labels = C.latent_labels(model, entry.labels, len(entry.items))
    cond = C.encode_items(model, [it.prompt() for it in entry.items], [C.ITEM_PROMPT_LENGTH] * len(entry.items))
    h, w = labels.shape
    width = cond.states.shape[-1]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, model.latent_channels, h, w, generator=g).to(device, dtype)
    plain_states = torch.randn(1, 77, width, generator=g).to(device, dtype)
    pooled = None if cond.pooled is None else cond.pooled.to(dtype)

    def plain_predict(x, states, batch):
        added = model.conditioner.added_cond_kwargs(None if pooled is None else pooled.expand(batch, -1), h * 8, w * 8)
        kwargs = {} if added is None else {"added_cond_kwargs": added}
        return unet(x, 500, encoder_hidden_states=states, **kwargs).sample

    def our_train_steps(n):
        marks = []
        more = FinetuneConfig(**{**config.__dict__, "stage2_steps": session.finetune_state["step"] + n + 1})
        finetune(model, session, more, progress=False, callback=lambda p, stage, step, kw: marks.append(now()) or kw)
        return statistics.median(np.diff(marks))

    def plain_train_steps(n):
        saved = _stock(unet)
        params = [p for name, p in model.delta.cross_attention_parameters().items()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-6)
        times = []
        for _ in range(n):
            start = now()
            pred = plain_predict(latents, plain_states, 1)
            torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(now() - start)
        for p in params:
            p.requires_grad_(False)
        unet.set_attn_processor(saved)
        model.delta.reset_unet()              # AdamW changed the weights in place: the session's own delta again
        model.use_session(session)
        return statistics.median(times)

    def our_sample_steps(n):
        model.use_session(session)
        batch = C.batch([cond, C.unconditional(model)], [labels, torch.zeros_like(labels)])
        states, layout, pooled_b = batch
        x = torch.cat([latents, latents])
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = now()
                model.predict(x, 500, states.to(dtype), ItemLayout(layout.labels, layout.spans),
                              None if pooled_b is None else pooled_b.to(dtype))
                times.append(now() - start)
        return statistics.median(times)

    def plain_sample_steps(n):
        saved = _stock(unet)
        x, states = torch.cat([latents, latents]), torch.cat([plain_states, plain_states])
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = now()
                plain_predict(x, states, 2)
                times.append(now() - start)
        unet.set_attn_processor(saved)
        return statistics.median(times)

    train, sample = [], []
    for r in range(rounds):
        pairs = [(our_train_steps, plain_train_steps), (our_sample_steps, plain_sample_steps)]
        for (ours, plain), out in zip(pairs, (train, sample)):
            if r % 2 == 0:
                a, b = ours(steps), plain(steps)
            else:
                b, a = plain(steps), ours(steps)
            out.append(a / b)
        print(f"  round {r + 1}: finetune step {train[-1]:.3f}x, sampling step {sample[-1]:.3f}x", flush=True)
    return train, sample


SPEEDUPS = ("min_snr_gamma", "init_tokens_from_name", "lr_warmup_steps", "lr_schedule")


def speedup_costs(model, session: Session, config: FinetuneConfig, rounds: int, steps: int
                  ) -> tuple[list[float], list[float]]:
    """Per round: (a stage-2 step with the offline profile's speed-ups / a reference step, one validation loss
    / a reference step), each a median over ``steps`` steps of a fresh finetune of a copy of ``session``."""
    now = timer(model.device)
    offline = PROFILES["offline"]
    fast = {name: getattr(offline, name) for name in SPEEDUPS}
    variants = {"reference": dict(validate_every=0), "speed-ups": dict(fast, validate_every=0),
                "speed-ups, validating every step": dict(fast, validate_every=1)}
    copies = {}

    def step_time(name: str) -> float:
        marks = []
        if name not in copies:
            copies[name] = session.copy_to(session.folder.parent / f"speedups-{len(copies)}")
        cfg = FinetuneConfig(**{**config.__dict__, "stage1_steps": 0, "stage2_steps": steps + 1, **variants[name]})
        finetune(model, copies[name], cfg, progress=False, resume=False,
                 callback=lambda p, stage, step, kw: marks.append(now()) or kw)
        return statistics.median(np.diff(marks))

    step, validation = [], []
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        times = {name: step_time(name) for name in order}
        step.append(times["speed-ups"] / times["reference"])
        validation.append((times["speed-ups, validating every step"] - times["speed-ups"]) / times["reference"])
        print(f"  round {r + 1}: step with speed-ups {step[-1]:.3f}x, a validation {validation[-1]:.3f} steps",
              flush=True)
    return step, validation


# ---------------------------------------------------------------------------------------------------------
# The workflow
# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--resolution", type=int, default=None, help="short side; default 512 (SD 1.5) / 1024 (SDXL)")
    parser.add_argument("--stage1-steps", type=int, default=2)
    parser.add_argument("--stage2-steps", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ratio-steps", type=int, default=2, help="timed steps per round and side")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "realsize"))
    parser.add_argument("--model", help="a model folder (or offline) to use instead of the --family one built here "
                                        "(e.g. to time the speed-ups on a CPU: --model offline --phases speedups)")
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    runs = Path(args.runs)
    device = torch.device(args.device) if args.device else None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads())

    probe = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None else device
    folder = OFFLINE_MODEL_DIR if args.model == "offline" else Path(args.model) if args.model else runs / args.family
    if not (folder / "model_index.json").exists():   # built in a child process: its memory is not ours to measure
        import multiprocessing
        with Phase(f"build {args.family} folder (child process)", probe):
            child = multiprocessing.get_context("spawn").Process(target=build_folder, args=(args.family, folder))
            child.start()
            child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building {folder} failed")
    with Phase("load_model", probe) as phase:
        model = load_model(str(folder), device=device, dtype=args.dtype)
        if args.vae_tiling:
            model.enable_vae_tiling()
    unet_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    print(f"{args.family} on {model.device} in {model.dtype}: UNet {unet_bytes / 2 ** 30:.2f} GiB, "
          f"{sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f} M parameters", flush=True)

    from dedit_nb.segment import segment_session
    resolution = args.resolution or RESOLUTION[args.family]
    work = runs / "work" / f"{args.family}-{str(model.dtype).split('.')[-1]}"
    shutil.rmtree(work, ignore_errors=True)
    with Phase("session + offline segmentation", model.device):
        session = Session.create(work / "session", EXAMPLES / "coffee.jpg", resolution=resolution,
                                 multiple=model.latent_factor)
        segment_session(session, 0, method="offline", num_items=6)
    print(f"  working size {session.images[0].size}, fit {session.images[0].fit}", flush=True)
    lora_session = session.copy_to(work / "lora") if "lora" in phases else None
    config = FinetuneConfig(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                            checkpoint_every=10 ** 6, gradient_checkpointing=args.gradient_checkpointing)

    if "finetune" in phases or "edits" in phases or "ratios" in phases:
        with Phase("finetune stage 1 (interrupted after 1 step)", model.device) as phase:
            finetune(model, session, config, progress=False, callback=lambda p, stage, step, kw: p.stop() or kw)
            phase.saved = describe(weight_files(session), unet_bytes)
        with Phase("finetune resumed, interrupted after stage 2's first step", model.device) as phase:
            finetune(model, session, config, progress=False,
                     callback=lambda p, stage, step, kw: (stage == "stage2" and p.stop()) or kw)
            phase.saved = describe(weight_files(session), unet_bytes)
        with Phase("finetune resumed to the end (attention mode)", model.device) as phase:
            result = finetune(model, session, config, progress=False)
            assert result.completed and all(np.isfinite(v) for s in result.loss.values() for v in s), result.loss
            phase.saved = describe(weight_files(session), unet_bytes)

    if lora_session is not None:
        with Phase("finetune (LoRA), uninterrupted", model.device) as phase:
            result = finetune(model, lora_session, FinetuneConfig(**{**config.__dict__, "lora": True}), progress=False)
            assert result.completed and all(np.isfinite(v) for s in result.loss.values() for v in s), result.loss
            phase.saved = describe(weight_files(lora_session), unet_bytes)

    if "edits" in phases:
        editor = Editor(model, session, progress=False)
        sampling = dict(steps=args.sample_steps, guidance=5.0)
        items = [it.name for it in session.images[0].items]
        original = session.images[0].working
        for name, run in [("recon", lambda: editor.reconstruct(0, **sampling)),
                          ("text", lambda: editor.text(0, items[1], "a golden *", **sampling)),
                          ("move", lambda: editor.move(0, {items[1]: (40, 0)}, **sampling)),
                          ("remove", lambda: editor.remove(0, items[2], **sampling))]:
            with Phase(f"edit: {name} ({args.sample_steps} steps)", model.device):
                out = run()
            hard = out.regions.hard
            assert np.array_equal(out.images[0][hard], original[hard]), f"{name}: hard pixels changed"

    train = sample = None
    if "ratios" in phases:
        print(f"ratios to plain diffusers ({args.rounds} rounds, alternating):", flush=True)
        with Phase("ratios", model.device):
            train, sample = ratios(model, session, config, args.rounds, args.ratio_steps)

    speed = None
    if "speedups" in phases:
        print(f"speed-ups against the reference step ({args.rounds} rounds, alternating):", flush=True)
        with Phase("speed-ups", model.device):
            speed = speedup_costs(model, session, config, args.rounds, args.ratio_steps)

    print(f"\n{args.family}, {model.dtype}, {model.device}, working size {session.images[0].size}")
    print("| phase | wall s | peak GiB | saved |\n|---|---:|---:|---|")
    for name, wall, peak, saved in Phase.rows:
        print(f"| {name} | {wall:.1f} | {peak:.2f} | {saved} |")
    if train:
        print(f"\nfinetune step / plain diffusers: median {statistics.median(train):.3f} "
              f"({', '.join(f'{r:.3f}' for r in train)})")
        print(f"sampling step / plain diffusers: median {statistics.median(sample):.3f} "
              f"({', '.join(f'{r:.3f}' for r in sample)})")
    if speed:
        step, validation = (statistics.median(v) for v in speed)
        items = len(session.images[0].items)
        print(f"\nstep with the offline profile's speed-ups ({', '.join(SPEEDUPS)}) / reference step: median "
              f"{step:.3f} ({', '.join(f'{r:.3f}' for r in speed[0])}); one validation loss costs {validation:.3f} "
              f"reference steps ({VALIDATION_TIMESTEPS} forward samples per image, {items} items)")
        for name in ("sd1", "offline"):
            every = PROFILES[name].validate_every
            print(f"  validating every {every} steps ({name} profile): {step + validation / every:.3f}x a reference "
                  f"step; UNet passes per step {config.batch_size} + {VALIDATION_TIMESTEPS / every:.2f} (validation)")


if __name__ == "__main__":
    main()
