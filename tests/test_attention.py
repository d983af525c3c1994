"""Grouped cross-attention: equals the plain formula, isolates items, is stock attention otherwise."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dedit_nb import attention as A
from dedit_nb.attention import GroupedAttnProcessor, ItemLayout, grouped_attention


def reference_grouped(query, key, value, labels, spans):
    """Plain formula: each pixel's softmax runs over its own item's keys only (dense, masked)."""
    b, heads, n, d = query.shape
    scores = query @ key.transpose(-1, -2) / d ** 0.5          # (B, heads, N, S)
    allowed = torch.zeros(b, n, key.shape[2], dtype=torch.bool)
    for i in range(b):
        for p in range(n):
            s, e = spans[i][int(labels[i, p])]
            allowed[i, p, s:e] = True
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ value


def random_layout(batch, h, w, spans_per_elem, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, len(s), (h, w), generator=g) for s in spans_per_elem])
    return ItemLayout(labels, spans_per_elem)


@pytest.mark.parametrize("num_items", [1, 2, 4, 9])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (16, 4)])
def test_grouped_attention_equals_reference_formula(num_items, hw):
    h, w = hw
    spans = [[(i * 7, i * 7 + 7) for i in range(num_items)],           # contiguous, equal lengths
             [(0, 3)] + [(3 + 5 * i, 8 + 5 * i) for i in range(num_items - 1)]]  # unequal lengths
    total = 7 * num_items
    layout = random_layout(2, h, w, spans, seed=num_items)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, h * w, 8, generator=g)
    k = torch.randn(2, 3, total, 8, generator=g)
    v = torch.randn(2, 3, total, 8, generator=g)
    ours = grouped_attention(q, k, v, layout)
    ref = reference_grouped(q, k, v, layout.labels.reshape(2, -1), spans)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_batch_elements_sharing_a_layout_are_grouped_and_still_exact():
    spans = [[(0, 4), (4, 8)]] * 3 + [[(0, 8)]]
    labels = torch.zeros(4, 4, 4, dtype=torch.long)
    labels[:3, :, 2:] = 1
    layout = ItemLayout(labels, spans)
    assert sorted(map(sorted, layout._groups)) == [[0, 1, 2], [3]] and layout.num_layouts == 2
    q, k, v = torch.randn(4, 2, 16, 4), torch.randn(4, 2, 8, 4), torch.randn(4, 2, 8, 4)
    ref = reference_grouped(q, k, v, labels.reshape(4, -1), spans)
    assert (grouped_attention(q, k, v, layout) - ref).abs().max() <= 1e-5


def test_a_batch_of_many_layouts_takes_one_masked_attention_with_the_same_result(monkeypatch):
    # five scenes with different items and prompt lengths, keys padded to the longest, as in training
    spans = [[(0, 4)], [(0, 4), (4, 8)], [(0, 3), (3, 9), (9, 12)], [(0, 5), (5, 6)], [(0, 2), (2, 4), (4, 7), (7, 12)]]
    layout = random_layout(5, 6, 6, spans, seed=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 2, 36, 4, generator=g), torch.randn(5, 2, 12, 4, generator=g),
               torch.randn(5, 2, 12, 4, generator=g))
    ref = reference_grouped(q, k, v, layout.labels.reshape(5, -1), spans)
    assert (A.masked_grouped_attention(q, k, v, layout) - ref).abs().max() <= 1e-5
    assert (A.sorted_grouped_attention(q, k, v, layout) - ref).abs().max() <= 1e-5
    calls = []
    monkeypatch.setattr(A, "sorted_grouped_attention", lambda *a: calls.append("sorted"))
    monkeypatch.setattr(A, "masked_grouped_attention", lambda *a: calls.append("masked"))
    grouped_attention(q, k, v, layout)
    grouped_attention(q[:2], k[:2], v[:2], ItemLayout(layout.labels[:2], spans[:2]))   # guidance-sized batch
    grouped_attention(q, k, v, layout, masked_above_layouts=5)
    assert calls == ["masked", "sorted", "sorted"]
    with pytest.raises(ValueError, match="past the 10 tokens"):
        layout.key_mask(36, 10, torch.device("cpu"))


def _cross_attention_layer(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()


def test_processor_without_layout_is_stock_attention():
    attn = _cross_attention_layer()
    x, ctx = torch.randn(2, 24, 16), torch.randn(2, 10, 12)
    self_attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(AttnProcessor2_0())
    self_attn.set_processor(AttnProcessor2_0())
    stock_cross, stock_self = attn(x, ctx), self_attn(x)
    attn.set_processor(GroupedAttnProcessor())
    self_attn.set_processor(GroupedAttnProcessor())
    assert torch.equal(attn(x, ctx), stock_cross)
    assert torch.equal(self_attn(x), stock_self)
    # one item covering everything is ordinary cross-attention too
    layout = ItemLayout(torch.zeros(2, 4, 6, dtype=torch.long), [[(0, 10)], [(0, 10)]])
    assert torch.allclose(attn(x, ctx, item_layout=layout), stock_cross, atol=1e-6)


def test_changing_one_items_prompt_leaves_other_items_pixels_unchanged():
    attn = _cross_attention_layer()
    attn.set_processor(GroupedAttnProcessor())
    h, w = 4, 6
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[0, :, 3:] = 1
    labels[0, 2:, :2] = 2
    spans = [[(0, 5), (5, 10), (10, 15)]]
    layout = ItemLayout(labels, spans)
    x = torch.randn(1, h * w, 16)
    ctx = torch.randn(1, 15, 12)
    changed = ctx.clone()
    changed[0, 5:10] = torch.randn(5, 12)          # item 1 gets another prompt
    out_a = attn(x, ctx, item_layout=layout)
    out_b = attn(x, changed, item_layout=layout)
    flat = labels.reshape(-1)
    assert torch.equal(out_a[0, flat != 1], out_b[0, flat != 1])
    assert not torch.allclose(out_a[0, flat == 1], out_b[0, flat == 1])


def test_layout_is_resized_per_level_keeping_one_item_per_cell():
    labels = torch.zeros(1, 8, 12, dtype=torch.long)
    labels[0, :, 6:] = 1
    labels[0, 0, 0] = 2                       # a one-pixel item vanishes at coarse levels
    layout = ItemLayout(labels, [[(0, 2), (2, 4), (4, 6)]])
    coarse = layout.level_labels(2 * 3)
    assert coarse.shape == (1, 2, 3)
    assert coarse.tolist() == [[[0, 0, 1], [0, 0, 1]]]   # majority per 4x4 block; a 2-2 tie takes the lower index
    q, k, v = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    out = grouped_attention(q, k, v, layout)    # the vanished item is skipped, not a NaN
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="latent factor"):
        layout.level_labels(7)


def test_layout_rejects_labels_without_a_prompt_span():
    with pytest.raises(ValueError, match="only 1 prompt spans"):
        ItemLayout(torch.ones(1, 2, 2, dtype=torch.long), [[(0, 3)]])


def test_unet_with_grouped_processor_isolates_items_in_cross_attention(tiny_model):
    """Through the whole UNet: with one item's prompt changed, the first cross-attention layer's output
    at every other item's pixels is unchanged."""
    model = tiny_model
    captured = []
    layer = next(m for n, m in model.unet.named_modules() if n.endswith("attn2"))
    hook = layer.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))
    h = w = 8
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[0, :, 4:] = 1
    states, _ = model.conditioner.encode(["a cat", "a dog"], 8)
    other, _ = model.conditioner.encode(["a cat", "a red car"], 8)
    layout = ItemLayout(labels, [[(0, 8), (8, 16)]])
    pooled = torch.zeros(1, 32) if model.family == "sdxl" else None
    lat = torch.randn(1, model.latent_channels, h, w)
    with torch.no_grad():
        model.predict(lat, 10, states.reshape(1, 16, -1), layout, pooled)
        model.predict(lat, 10, other.reshape(1, 16, -1), ItemLayout(labels, [[(0, 8), (8, 16)]]), pooled)
    hook.remove()
    a, b = captured[0], captured[1]
    n = a.shape[1]
    level = layout.level_labels(n).reshape(-1)
    assert torch.allclose(a[0, level == 0], b[0, level == 0], atol=0, rtol=0)
    assert not torch.allclose(a[0, level == 1], b[0, level == 1])


def test_item_maps_follow_ceil_sized_levels_and_equal_the_dense_formula():
    """A 5x7 latent has UNet levels 3x4 and 2x2 (stride-2 convolutions round up): each cell takes the
    majority item of its block, cut short at the last row and column."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (1, 5, 7), generator=g)
    spans = [[(0, 3), (3, 8), (8, 12)]]
    layout = ItemLayout(labels, spans)
    for factor, (h, w) in ((2, (3, 4)), (4, (2, 2))):
        expected = torch.tensor([[int(torch.bincount(labels[0, i * factor:(i + 1) * factor,
                                                             j * factor:(j + 1) * factor].reshape(-1),
                                                     minlength=3).argmax()) for j in range(w)] for i in range(h)])
        assert torch.equal(layout.level_labels(h * w)[0], expected)
        q, k, v = torch.randn(1, 2, h * w, 4, generator=g), torch.randn(1, 2, 12, 4, generator=g), \
            torch.randn(1, 2, 12, 4, generator=g)
        ref = reference_grouped(q, k, v, expected.reshape(1, -1), spans)
        assert (grouped_attention(q, k, v, layout) - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no level"):
        layout.level_labels(3 * 3)


class _CheckingProcessor(GroupedAttnProcessor):
    """Checks every grouped call against the dense formula on the layer's own item map."""

    calls = []

    def grouped(self, query, key, value, layout):
        out = super().grouped(query, key, value, layout)
        labels = layout.level_labels(query.shape[2]).reshape(query.shape[0], -1)
        ref = reference_grouped(query, key, value, labels, layout.spans)
        self.calls.append((query.shape[2], (out - ref).abs().max().item()))
        return out


def test_a_unet_at_an_odd_latent_size_groups_its_coarse_levels_exactly(tiny_model_dirs):
    from dedit_nb.models import load_model
    model = load_model(str(tiny_model_dirs["offline"]))     # cross-attention at the second, ceil-sized level
    model.unet.set_attn_processor({n: _CheckingProcessor() if ".attn2." in n else p
                                   for n, p in model.unet.attn_processors.items()})
    labels = torch.zeros(1, 13, 9, dtype=torch.long)
    labels[0, :, 5:] = 1
    labels[0, 8:, :] = 2
    states, _ = model.conditioner.encode(["a cat", "a dog", "grass"], 6)
    _CheckingProcessor.calls.clear()
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 13, 9), 10, states.reshape(1, 18, -1),
                            ItemLayout(labels, [[(0, 6), (6, 12), (12, 18)]]))
    assert out.shape == (1, 3, 13, 9)
    assert {n for n, _ in _CheckingProcessor.calls} == {7 * 5}
    assert max(err for _, err in _CheckingProcessor.calls) <= 1e-5


def test_grouped_processor_goes_on_cross_attention_only(tiny_model):
    from diffusers.models.attention_processor import AttnProcessor
    unet = tiny_model.unet
    processors = unet.attn_processors
    assert processors and all(isinstance(p, GroupedAttnProcessor) == (".attn2." in n) for n, p in processors.items())
    unet.set_attn_processor(AttnProcessor())            # e.g. the user's choice of backend
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1
    states, _ = tiny_model.conditioner.encode(["a cat", "a dog"], 8)
    pooled = torch.zeros(1, 32) if tiny_model.family == "sdxl" else None
    run = lambda: tiny_model.predict(torch.randn(1, tiny_model.latent_channels, 8, 8), 10,  # noqa: E731
                                     states.reshape(1, 16, -1), ItemLayout(labels, [[(0, 8), (8, 16)]]), pooled)
    with torch.no_grad(), pytest.raises(RuntimeError, match="install_grouped_attention"):
        run()                                           # not sampled as if every pixel saw every prompt
    A.install_grouped_attention(unet)
    for name, p in unet.attn_processors.items():
        assert type(p) is (GroupedAttnProcessor if ".attn2." in name else AttnProcessor)
    with torch.no_grad():
        assert run().isfinite().all()
