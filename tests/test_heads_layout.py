"""Head layout: every slice is checked against what the model's own forward pass does with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_heads.errors import ModelError
from lit_heads.heads.layout import ARCHITECTURES, find_heads, supported_architectures
from tiny_models import ARCHS, tiny_model

EXPECTED = {
    # arch: (n_heads, n_kv_heads, head_dim, o_proj attribute)
    "llama": (4, 2, 8, "o_proj"),
    "mistral": (4, 2, 8, "o_proj"),
    "mixtral": (4, 2, 8, "o_proj"),
    "qwen2": (4, 2, 8, "o_proj"),
    "qwen3": (4, 2, 16, "o_proj"),
    "gemma": (4, 1, 16, "o_proj"),
    "gemma2": (4, 2, 16, "o_proj"),
    "phi3": (4, 2, 8, "o_proj"),
    "gpt2": (4, 4, 8, "c_proj"),
    "gpt_neox": (4, 4, 8, "dense"),
    "opt": (4, 4, 8, "out_proj"),
}


def test_every_registered_architecture_is_tested():
    assert set(ARCHS) == set(ARCHITECTURES) == set(EXPECTED)


def _head_inputs(model, layout, input_ids):
    """Inputs of every layer's output projection, viewed [B, T, H, hd]."""
    got = {}
    hooks = [
        lh.o_proj.register_forward_pre_hook(
            lambda m, args, i=lh.index: got.__setitem__(i, args[0].detach().clone())
        )
        for lh in layout.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    B, T = input_ids.shape
    return [got[i].view(B, T, layout.n_heads, layout.head_dim) for i in range(layout.n_layers)]


def _perturb(slices, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in slices:
            noise = torch.randn(s.select().shape, generator=g)
            s.param.index_add_(s.dim, s.index, noise)


def _ids():
    return torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_and_modules(arch):
    model = tiny_model(arch)
    layout = find_heads(model)
    n_heads, n_kv, hd, o_attr = EXPECTED[arch]
    assert (layout.arch, layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.head_dim) == (
        arch, 2, n_heads, n_kv, hd,
    )
    for lh in layout.layers:
        assert lh.o_proj is getattr(lh.attention, o_attr)
    # The base model gives the same modules (and names relative to the base model).
    base_layout = find_heads(model.base_model)
    assert [lh.o_proj for lh in base_layout.layers] == [lh.o_proj for lh in layout.layers]
    names = dict(model.named_parameters())
    for s in layout.layers[1].query_slices(0) + layout.layers[1].kv_slices(0) + layout.layers[1].output_slices(0):
        assert names[s.name] is s.param
    base_names = dict(model.base_model.named_parameters())
    for s in base_layout.layers[0].output_slices(1):
        assert base_names[s.name] is s.param


@pytest.mark.parametrize("arch", ARCHS)
def test_query_slices_move_only_that_head(arch):
    model = tiny_model(arch)
    layout = find_heads(model)
    ids = _ids()
    before = _head_inputs(model, layout, ids)
    layer, head = 1, 2
    _perturb(layout.layers[layer].query_slices(head), seed=3)
    after = _head_inputs(model, layout, ids)
    assert torch.equal(before[0], after[0])  # earlier layer untouched
    diff = (after[layer] - before[layer]).abs().amax(dim=(0, 1, 3))
    assert diff[head] > 1e-4
    others = [h for h in range(layout.n_heads) if h != head]
    assert torch.all(diff[others] == 0), diff


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_slices_move_only_heads_of_that_group(arch):
    model = tiny_model(arch)
    layout = find_heads(model)
    ids = _ids()
    before = _head_inputs(model, layout, ids)
    layer = 0
    group = layout.n_kv_heads - 1
    _perturb(layout.layers[layer].kv_slices(group), seed=4)
    after = _head_inputs(model, layout, ids)
    diff = (after[layer] - before[layer]).abs().amax(dim=(0, 1, 3))
    members = layout.layers[layer].heads_of_group(group)
    assert members == [h for h in range(layout.n_heads) if layout.kv_group_of(h) == group]
    assert all(layout.layers[layer].kv_group_of(h) == group for h in members)
    assert torch.all(diff[members] > 1e-4), diff
    others = [h for h in range(layout.n_heads) if h not in members]
    assert torch.all(diff[others] == 0), diff


@pytest.mark.parametrize("arch", ARCHS)
def test_output_slices_are_the_columns_reading_that_head(arch):
    model = tiny_model(arch)
    layout = find_heads(model)
    lh = layout.layers[1]
    head = 1
    x = torch.randn(3, lh.n_heads * lh.head_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = lh.o_proj(x)
        xv = x.view(3, lh.n_heads, lh.head_dim).clone()
        xv[:, head] = 0
        expected = lh.o_proj(xv.view(3, -1))
        # Zeroing the head's columns in the weight must equal zeroing its input block.
        (s,) = lh.output_slices(head)
        assert s.param is lh.o_proj.weight
        s.param.index_fill_(s.dim, s.index, 0.0)
        got = lh.o_proj(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, full)


@pytest.mark.parametrize("arch", ARCHS)
def test_slices_partition_attention_parameters(arch):
    """Every q/k/v/o-weight entry belongs to exactly one head (q, o) or one KV group (k, v)."""
    model = tiny_model(arch)
    layout = find_heads(model)
    for lh in layout.layers:
        counts: dict[int, torch.Tensor] = {}
        params = {}
        for s in [s for h in range(lh.n_heads) for s in lh.query_slices(h) + lh.output_slices(h)] + [
            s for g in range(lh.n_kv_heads) for s in lh.kv_slices(g)
        ]:
            params[id(s.param)] = s
            counts[id(s.param)] = counts.get(id(s.param), 0) + s.mask().int()
            assert s.numel == s.select().numel()
        for key, c in counts.items():
            assert torch.all(c == 1), f"{params[key].name}: entries covered {c.unique().tolist()} times"
        # All q/k/v parameters of the attention module are covered (besides o's shared bias).
        attn_params = {id(p) for n, p in lh.attention.named_parameters() if "norm" not in n}
        attn_params.discard(id(getattr(lh.o_proj, "bias", None)))
        assert attn_params == set(counts), sorted(n for n, _ in lh.attention.named_parameters())


def test_gpt_neox_interleaving_matches_model_reshape():
    model = tiny_model("gpt_neox")
    layout = find_heads(model)
    lh = layout.layers[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        qkv = lh.attention.query_key_value(x)
        # The model's own split: view [.., heads, 3*hd] then chunk(3) per head.
        q, k, v = qkv.view(2, 5, lh.n_heads, 3 * lh.head_dim).chunk(3, dim=-1)
        for h in range(lh.n_heads):
            w, b = lh.query_slices(h)
            torch.testing.assert_close(x @ w.select().T + b.select(), q[:, :, h], rtol=0, atol=1e-6)
            kw, kb, vw, vb = lh.kv_slices(h)
            torch.testing.assert_close(x @ kw.select().T + kb.select(), k[:, :, h], rtol=0, atol=1e-6)
            torch.testing.assert_close(x @ vw.select().T + vb.select(), v[:, :, h], rtol=0, atol=1e-6)


def test_gpt2_conv1d_slices_match_model_split():
    model = tiny_model("gpt2")
    layout = find_heads(model)
    lh = layout.layers[1]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        q, k, v = lh.attention.c_attn(x).split(32, dim=2)
        for h in range(4):
            w, b = lh.query_slices(h)
            assert w.dim == 1  # Conv1D weight is [in, out]
            torch.testing.assert_close(x @ w.select() + b.select(), q[..., h * 8 : (h + 1) * 8], rtol=0, atol=1e-6)
            kw, kb, vw, vb = lh.kv_slices(h)
            torch.testing.assert_close(x @ vw.select() + vb.select(), v[..., h * 8 : (h + 1) * 8], rtol=0, atol=1e-6)
        (o,) = lh.output_slices(2)
        assert o.dim == 0 and o.param is lh.o_proj.weight


def test_phi3_gqa_fused_rows():
    model = tiny_model("phi3")
    lh = find_heads(model).layers[0]
    (q3,) = lh.query_slices(3)
    k1, v1 = lh.kv_slices(1)
    # rows: q = 4 heads * 8, then k = 2 groups * 8, then v = 2 groups * 8
    assert q3.index.tolist() == list(range(24, 32))
    assert k1.index.tolist() == list(range(40, 48))
    assert v1.index.tolist() == list(range(56, 64))


def test_head_dim_read_from_config_not_hidden():
    model = tiny_model("qwen3")  # hidden 32, 4 heads, head_dim 16
    layout = find_heads(model)
    assert layout.head_dim == 16 and layout.layers[0].o_proj.in_features == 64


def test_unwraps_ddp_like_and_compiled_wrappers():
    model = tiny_model("llama")

    class Compiled(nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    layout = find_heads(Compiled(model))
    assert layout.layers[0].o_proj is model.model.layers[0].self_attn.o_proj


def test_unknown_architecture_error_lists_supported():
    class Cfg:
        model_type = "bert"

    class Fake(nn.Module):
        config = Cfg()

    with pytest.raises(ModelError) as e:
        find_heads(Fake())
    msg = str(e.value)
    assert "'bert'" in msg and "ARCHITECTURES" in msg and "layout.py" in msg
    for arch in supported_architectures():
        assert arch in msg


def test_not_a_transformers_model():
    with pytest.raises(ModelError, match="model_type"):
        find_heads(nn.Linear(2, 2))


def test_index_errors_for_out_of_range_heads():
    lh = find_heads(tiny_model("llama")).layers[0]
    with pytest.raises(IndexError):
        lh.query_slices(4)
    with pytest.raises(IndexError):
        lh.kv_slices(2)


def test_heads_package_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, lit_heads.heads; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
