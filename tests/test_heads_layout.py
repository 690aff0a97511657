"""Head layout discovery: every slice is checked against what the model's own forward pass does with it,
fused layouts against the model's own split code, and every refusal for its message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import arch_sweep
from lit_heads.errors import ModelError
from lit_heads.heads import layout as layout_module
from lit_heads.heads.layout import ARCHITECTURES, HeadsNotFound, Override, find_heads
from lit_heads.heads.restrict import HeadRestriction
from tiny_models import ARCHS, tiny_config, tiny_model

EXPECTED = {
    # arch: (n_heads, n_kv_heads, head_dim, output projection attribute)
    "llama": (4, 2, 8, "o_proj"),
    "mistral": (4, 2, 8, "o_proj"),
    "mixtral": (4, 2, 8, "o_proj"),
    "qwen2": (4, 2, 8, "o_proj"),
    "qwen3": (4, 2, 16, "o_proj"),
    "gemma": (4, 1, 16, "o_proj"),
    "gemma2": (4, 2, 16, "o_proj"),
    "gemma3_text": (4, 1, 256, "o_proj"),
    "phi3": (4, 2, 8, "o_proj"),
    "gpt2": (4, 4, 8, "c_proj"),
    "gpt_neox": (4, 4, 8, "dense"),
    "opt": (4, 4, 8, "out_proj"),
    "falcon": (4, 1, 8, "dense"),
    "falcon_gqa": (4, 2, 8, "dense"),
    "bloom": (4, 4, 8, "dense"),
    "gpt_bigcode": (4, 1, 8, "c_proj"),
    "codegen": (8, 8, 8, "out_proj"),
}


def test_every_tiny_architecture_has_expectations():
    assert set(ARCHS) == set(EXPECTED)


def test_the_registry_holds_no_architecture():
    # Discovery finds every supported model type; the registry is for overrides only.
    assert ARCHITECTURES == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_and_modules(arch):
    model = tiny_model(arch)
    layout = find_heads(model)
    n_heads, n_kv, hd, o_attr = EXPECTED[arch]
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.head_dim) == (2, n_heads, n_kv, hd)
    assert layout.arch == model.config.model_type
    for lh in layout.layers:
        assert lh.o_proj is getattr(lh.attention, o_attr)
        assert (lh.n_heads, lh.n_kv_heads, lh.head_dim) == (n_heads, n_kv, hd)
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
def test_slices_match_the_forward_pass(arch):
    """Through the weights (not the probe's output hooks): a head's q slices move only that head, a
    KV group's k/v slices only its heads, o columns read exactly their head, and the slices
    partition the projection weights."""
    model = tiny_model(arch)
    arch_sweep.verify_layout(model, find_heads(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_slices_cover_every_attention_weight(arch):
    model = tiny_model(arch)
    for lh in find_heads(model).layers:
        covered = {id(s.param) for h in range(lh.n_heads) for s in lh.query_slices(h) + lh.output_slices(h)}
        covered |= {id(s.param) for g in range(lh.n_kv_heads) for s in lh.kv_slices(g)}
        attn_params = {id(p) for n, p in lh.attention.named_parameters() if "norm" not in n}
        attn_params.discard(id(getattr(lh.o_proj, "bias", None)))  # shared by all heads
        assert attn_params == covered, sorted(n for n, _ in lh.attention.named_parameters())


def _project(slices, x):
    """x through the rows (or Conv1D columns) the slices select, bias included."""
    w = next(s for s in slices if s.param.dim() == 2)
    out = x @ (w.select().T if w.dim == 0 else w.select())
    b = [s for s in slices if s.param.dim() == 1]
    return out + b[0].select() if b else out


def _gpt_neox_split(attn, fused, n_heads, n_kv, hd):
    q, k, v = fused.view(*fused.shape[:2], n_heads, 3 * hd).chunk(3, dim=-1)
    return q, k, v


def _falcon_split(attn, fused, n_heads, n_kv, hd):
    q, k, v = attn._split_heads(fused)
    per = n_heads // n_kv
    # The new architecture broadcasts each group's k/v to its query heads: one per group.
    return q, (k[:, :, ::per] if k.shape[2] == n_heads else k), (v[:, :, ::per] if v.shape[2] == n_heads else v)


def _bloom_split(attn, fused, n_heads, n_kv, hd):
    return tuple(t.transpose(1, 2) for t in attn._reshape(fused))


def _codegen_split(attn, fused, n_heads, n_kv, hd):
    # modeling_codegen.CodeGenAttention.forward: mp_num blocks of [query | value | key].
    local_dim = attn.embed_dim // attn.mp_num
    query, value, key = fused.view(*fused.shape[:2], -1, 3 * local_dim).split(local_dim, dim=-1)
    return tuple(t.reshape(*fused.shape[:2], -1, hd) for t in (query, key, value))


def _bigcode_split(attn, fused, n_heads, n_kv, hd):
    # modeling_gpt_bigcode.GPTBigCodeAttention.forward, multi_query branch.
    q, k, v = fused.split((attn.embed_dim, attn.kv_dim, attn.kv_dim), dim=-1)
    return tuple(t.view(*fused.shape[:2], -1, hd) for t in (q, k, v))


def _phi3_split(attn, fused, n_heads, n_kv, hd):
    q, k, v = fused.split((n_heads * hd, n_kv * hd, n_kv * hd), dim=-1)
    return tuple(t.view(*fused.shape[:2], -1, hd) for t in (q, k, v))


def _gpt2_split(attn, fused, n_heads, n_kv, hd):
    q, k, v = fused.split(n_heads * hd, dim=-1)
    return tuple(t.view(*fused.shape[:2], -1, hd) for t in (q, k, v))


FUSED = {
    "gpt_neox": ("query_key_value", _gpt_neox_split),
    "falcon": ("query_key_value", _falcon_split),
    "falcon_gqa": ("query_key_value", _falcon_split),
    "bloom": ("query_key_value", _bloom_split),
    "codegen": ("qkv_proj", _codegen_split),
    "gpt_bigcode": ("c_attn", _bigcode_split),
    "phi3": ("qkv_proj", _phi3_split),
    "gpt2": ("c_attn", _gpt2_split),
}


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_slices_match_the_models_own_split(arch):
    """Falcon MQA and GQA, BLOOM and GPT-NeoX interleaving, GPT-BigCode MQA, CodeGen's mp_num blocks,
    Phi-3 and GPT-2: each head's (group's) slices reproduce exactly the q (k, v) the model's own code
    cuts out of the fused projection."""
    model = tiny_model(arch)
    layout = find_heads(model)
    attr, split = FUSED[arch]
    lh = layout.layers[1]
    fused_module = getattr(lh.attention, attr)
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        q, k, v = split(lh.attention, fused_module(x), lh.n_heads, lh.n_kv_heads, lh.head_dim)
        assert q.shape[2] == lh.n_heads and k.shape[2] == v.shape[2] == lh.n_kv_heads
        for h in range(lh.n_heads):
            torch.testing.assert_close(_project(lh.query_slices(h), x), q[:, :, h], rtol=0, atol=1e-5)
        for g in range(lh.n_kv_heads):
            torch.testing.assert_close(_project(lh.key_slices(g), x), k[:, :, g], rtol=0, atol=1e-5)
            torch.testing.assert_close(_project(lh.value_slices(g), x), v[:, :, g], rtol=0, atol=1e-5)


def test_codegen_blocks_give_the_expected_rows():
    # 8 heads in 4 blocks of 2; block b holds rows [q | v | k], each 2 heads x 8 wide.
    lh = find_heads(tiny_model("codegen")).layers[0]
    (q5,) = lh.query_slices(5)
    k5, v5 = lh.kv_slices(5)
    assert q5.index.tolist() == list(range(104, 112))
    assert v5.index.tolist() == list(range(120, 128))
    assert k5.index.tolist() == list(range(136, 144))


def test_phi3_gqa_fused_rows():
    lh = find_heads(tiny_model("phi3")).layers[0]
    (q3,) = lh.query_slices(3)
    k1, v1 = lh.kv_slices(1)
    # rows: q = 4 heads * 8, then k = 2 groups * 8, then v = 2 groups * 8
    assert q3.index.tolist() == list(range(24, 32))
    assert k1.index.tolist() == list(range(40, 48))
    assert v1.index.tolist() == list(range(56, 64))


def test_head_dim_read_from_the_model_not_hidden_size():
    layout = find_heads(tiny_model("qwen3"))  # hidden 32, 4 heads, head_dim 16
    assert layout.head_dim == 16 and layout.layers[0].o_proj.in_features == 64
    gemma3 = find_heads(tiny_model("gemma3_text"))  # head_dim 256 with hidden 32, as in Gemma 3 270M
    assert gemma3.head_dim == 256 and gemma3.n_kv_heads == 1


def test_layers_with_different_head_widths():
    # Gemma 4: full-attention layers have wider heads than sliding ones; every layer keeps its own.
    model = arch_sweep.tiny_model("gemma4_text")
    layout = find_heads(model)
    widths = [lh.head_dim for lh in layout.layers]
    assert layout.head_dim is None and len(set(widths)) == 2
    for lh in layout.layers:
        assert lh.o_proj.in_features == lh.n_heads * lh.head_dim
    arch_sweep.verify_layout(model, layout)


def test_unwraps_ddp_like_and_compiled_wrappers():
    model = tiny_model("llama")
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called, and find_heads unwraps it
    assert compiled is not model
    layout = find_heads(nn.DataParallel(compiled))
    assert layout.layers[0].o_proj is model.model.layers[0].self_attn.o_proj


def test_probe_leaves_the_model_as_found_and_is_cached():
    model = tiny_model("llama", attention_dropout=0.3)
    model.train()
    model.model.layers[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    layout = find_heads(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())
    assert find_heads(model) is layout  # cached per model object
    # A changed module tree is probed again.
    model.model.layers[0].self_attn.o_proj = nn.Linear(32, 32, bias=False)
    fresh = find_heads(model)
    assert fresh is not layout and fresh.layers[0].o_proj is model.model.layers[0].self_attn.o_proj


def test_a_head_restricted_model_is_found_with_its_base_parameters():
    model = tiny_model("gpt2")
    q_weight = model.transformer.h[0].attn.c_attn.weight
    restriction = HeadRestriction(model, [(0, 1)]).apply()
    layout_module._CACHE.clear()  # force a probe through the parametrized modules
    lh = find_heads(model).layers[0]
    (w, b) = lh.query_slices(1)
    assert w.param is q_weight and isinstance(w.param, nn.Parameter)
    restriction.remove()


def test_bfloat16_model():
    layout = find_heads(tiny_model("llama", dtype=torch.bfloat16))
    assert (layout.n_heads, layout.n_kv_heads, layout.head_dim) == (4, 2, 8)


# -- refusals ----------------------------------------------------------------------------------


def test_model_without_attention():
    with pytest.raises(HeadsNotFound, match="none of its 2 MambaBlock layers has an attention module made of") as e:
        find_heads(arch_sweep.tiny_model("mamba"))
    assert e.value.kind == "no attention" and isinstance(e.value, ModelError)


def test_hybrid_model():
    with pytest.raises(HeadsNotFound, match=r"hybrid model: layers \[0\] of 2 have no attention") as e:
        find_heads(arch_sweep.tiny_model("jamba"))
    assert e.value.kind == "hybrid"


@pytest.mark.parametrize("model_type", ["diffllama", "deepseek_v3"])
def test_heads_mixed_before_the_output_projection(model_type):
    # Differential attention subtracts pairs of heads; DeepSeek's MLA shares a low-rank query.
    with pytest.raises(HeadsNotFound, match=r"change the outputs of heads \[0, 1") as e:
        find_heads(arch_sweep.tiny_model(model_type))
    assert e.value.kind == "heads mixed" and "not a concatenation of independent heads" in str(e.value)


def test_ambiguous_decoder_layers():
    # Two decoder stacks that both run on text (HRM's high- and low-level modules).
    with pytest.raises(HeadsNotFound, match=r"L_module.layers.*H_module.layers.*Override\(layers="):
        find_heads(arch_sweep.tiny_model("hrm_text"))


def test_overrides(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "llama", Override(refuse="not today: a reason"))
    with pytest.raises(HeadsNotFound, match="llama: not today: a reason") as e:
        find_heads(tiny_model("llama"))
    assert e.value.kind == "refused"
    monkeypatch.setitem(ARCHITECTURES, "llama", Override(layers="layers", attention="self_attn"))
    model = tiny_model("llama")
    assert find_heads(model).layers[1].attention is model.model.layers[1].self_attn
    monkeypatch.setitem(ARCHITECTURES, "llama", Override(layers="blocks"))
    with pytest.raises(HeadsNotFound, match="`blocks` of LlamaModel, but there is nothing there"):
        find_heads(tiny_model("llama"))


def test_not_a_transformers_model():
    with pytest.raises(ModelError, match="model_type"):
        find_heads(nn.Linear(2, 2))


def test_index_errors_for_out_of_range_heads():
    lh = find_heads(tiny_model("llama")).layers[0]
    with pytest.raises(IndexError):
        lh.query_slices(4)
    with pytest.raises(IndexError):
        lh.kv_slices(2)


@pytest.mark.slow
def test_heads_package_does_not_import_lightning():
    code = ("import sys, lit_heads.heads; "
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon_gqa", "bloom"])
def test_a_model_without_weights_gets_the_layout_of_the_loaded_one(arch):
    """`lit_heads plan` and the checks before loading build the model on the meta device; its layout
    (found through a small materialised twin) names the same parameters and rows as the real model's."""
    real = find_heads(tiny_model(arch))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    meta = find_heads(skeleton)
    assert (meta.shape, meta.n_kv_heads, meta.head_dim) == (real.shape, real.n_kv_heads, real.head_dim)

    def described(layout):
        return [[(s.name, s.dim, s.index.tolist()) for h in range(layout.n_heads)
                 for s in [*lay.query_slices(h), *lay.output_slices(h)]]
                + [[(s.name, s.dim, s.index.tolist()) for s in lay.kv_slices(g)] for g in range(lay.n_kv_heads)]
                for lay in layout.layers]

    assert described(meta) == described(real)
