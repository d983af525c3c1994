"""Time a UNet forward with grouped cross-attention against the stock processor and a per-item loop.

    python benchmarks/grouped_attention.py [--latent 64] [--repeats 3]

All three run in one process on the same UNet (SD-like layout at reduced width: cross_attention_dim 768,
a 64x64 latent, batch 2 as in classifier-free guidance), and the table gives times as ratios to the stock
processor with one 77-token prompt:

- stock: diffusers' AttnProcessor2_0, every pixel attends to one prompt (no items);
- grouped: dedit_nb's GroupedAttnProcessor, each pixel attends to its own item's 40-token prompt;
- per-item loop: like the reference code, every item runs a full attention over all pixels and the
  outputs are masked and summed (K full attentions).

A second table times a training step (forward and backward) of the offline model's UNet on a batch of 32
different scenes with 1-4 items each, as its training script runs them: grouped attention by sorting
(one call per item of every scene) against one masked call, which the processor picks for such batches.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dedit_nb.attention import GroupedAttnProcessor, ItemLayout
from dedit_nb.offline.train import TEXT_LENGTH, unet_config


class PerItemLoopProcessor(GroupedAttnProcessor):
    """The reference's way: K full attentions, each masked to its item's pixels, summed."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 item_layout=None):
        if encoder_hidden_states is None or item_layout is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, None)
        batch, n, _ = hidden_states.shape
        labels = item_layout.level_labels(n).reshape(batch, n)
        query = attn.to_q(hidden_states)
        out = torch.zeros_like(query)
        head_dim = query.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        for k, (s, e) in enumerate(item_layout.spans[0]):
            ctx = encoder_hidden_states[:, s:e]
            key = attn.to_k(ctx).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = attn.to_v(ctx).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, key, value).transpose(1, 2).reshape(batch, n, -1)
            out = out + o * (labels == k)[..., None]
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def blocks(latent: int, k: int) -> torch.Tensor:
    """K items as vertical stripes of unequal width (a partition of the latent)."""
    edges = torch.linspace(0, 1, k + 1) ** 1.3 * latent
    cols = torch.arange(latent)
    labels = (cols[None, :] >= edges[1:-1, None]).sum(0)
    return labels.expand(latent, latent)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def training_batch(repeats: int) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config())
    batch, size = 32, 32
    items = torch.randint(1, 5, (batch,)).tolist()
    labels = torch.stack([torch.randint(0, k, (size // 4, size // 4)).repeat_interleave(4, 0).repeat_interleave(4, 1)
                          for k in items])
    spans = [[(i * TEXT_LENGTH, (i + 1) * TEXT_LENGTH) for i in range(k)] for k in items]
    states = torch.randn(batch, max(items) * TEXT_LENGTH, 384)
    x, t = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

    def step(processor: GroupedAttnProcessor):
        def run():
            unet.set_attn_processor(processor)
            layout = ItemLayout(labels, spans)
            out = unet(x, t, encoder_hidden_states=states, cross_attention_kwargs={"item_layout": layout}).sample
            out.square().mean().backward()
            unet.zero_grad(set_to_none=True)
        return run

    by_sorting = timed(step(GroupedAttnProcessor(masked_above_layouts=batch)), repeats)
    masked = timed(step(GroupedAttnProcessor()), repeats)
    print(f"\noffline UNet training step, batch {batch} scenes with 1-4 items, {torch.get_num_threads()} threads")
    print(f"by sorting: {by_sorting:.3f} s | masked: {masked:.3f} s | masked / sorting {masked / by_sorting:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, nargs="+", default=[2, 4, 8, 16])
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 128, 256, 256), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32, layers_per_block=1).eval()
    batch, item_len = 2, 40
    x = torch.randn(batch, 4, args.latent, args.latent)
    t = torch.tensor(500)

    def forward(processor, states, kwargs):
        unet.set_attn_processor(processor)
        with torch.no_grad():
            return lambda: unet(x, t, encoder_hidden_states=states, cross_attention_kwargs=kwargs)

    stock = timed(forward(AttnProcessor2_0(), torch.randn(batch, 77, 768), None), args.repeats)
    print(f"UNet forward, latent {args.latent}x{args.latent}, batch {batch}, {torch.get_num_threads()} threads; "
          f"stock processor (one 77-token prompt): {stock:.3f} s")
    print(f"{'K':>3} | {'grouped':>14} | {'per-item loop':>14} | loop / grouped")
    for k in args.items:
        labels = blocks(args.latent, k)[None].expand(batch, -1, -1).contiguous()
        spans = [[(i * item_len, (i + 1) * item_len) for i in range(k)]] * batch
        states = torch.randn(batch, k * item_len, 768)
        grouped = timed(forward(GroupedAttnProcessor(), states, {"item_layout": ItemLayout(labels, spans)}),
                        args.repeats)
        loop = timed(forward(PerItemLoopProcessor(), states, {"item_layout": ItemLayout(labels, spans)}),
                     args.repeats)
        print(f"{k:>3} | {grouped / stock:>12.2f}x | {loop / stock:>12.2f}x | {loop / grouped:.2f}")
    training_batch(args.repeats)


if __name__ == "__main__":
    main()
