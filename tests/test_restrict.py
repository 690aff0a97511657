import io

import pytest
import torch
import transformers

import arch_sweep
from lit_heads.errors import ConfigError
from lit_heads.heads.layout import find_heads
from lit_heads.heads.restrict import HeadDelta, HeadRestriction
from tiny_models import ARCHS, sft_batch, tiny_model

HIDDEN, HD = 32, 8  # tiny_models: hidden 32, 4 query heads of 8 dims; Llama has 2 KV groups
HEADS = [(0, 1), (1, 2), (1, 3)]


def _train(model, params, steps=3, weight_decay=0.1, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        model(**sft_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _logits(model, seed=99):
    with torch.no_grad():
        return model(**sft_batch(seed=seed)).logits


def _masks(model):
    return {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def _llama_expected(model, heads, kv):
    """Trained entries of a tiny Llama, written from the Llama layout itself (not from layout.py)."""
    m = _masks(model)
    for l, h in heads:
        pre = f"model.layers.{l}.self_attn."
        rows = slice(h * HD, (h + 1) * HD)
        m[pre + "q_proj.weight"][rows, :] = True
        m[pre + "o_proj.weight"][:, rows] = True
        if kv == "group":
            g = h // 2  # 4 query heads share 2 KV heads
            for proj in ("k_proj", "v_proj"):
                m[pre + proj + ".weight"][g * HD : (g + 1) * HD, :] = True
    return m


def _gpt2_expected(model, heads, kv):
    """GPT-2: c_attn is a Conv1D [in, 3*hidden] with output columns q | k | v; c_proj is [in, out]."""
    m = _masks(model)
    for l, h in heads:
        pre = f"transformer.h.{l}.attn."
        parts = [0] + ([HIDDEN, 2 * HIDDEN] if kv == "group" else [])
        for offset in parts:
            cols = slice(offset + h * HD, offset + (h + 1) * HD)
            m[pre + "c_attn.weight"][:, cols] = True
            m[pre + "c_attn.bias"][cols] = True
        m[pre + "c_proj.weight"][h * HD : (h + 1) * HD, :] = True
    return m


EXPECTED = {"llama": _llama_expected, "gpt2": _gpt2_expected}


@pytest.mark.parametrize("kv", ["group", "none"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_moves_exactly_the_selected_entries(arch, kv):
    model = tiny_model(arch)
    before = _snapshot(model)
    params_before = dict(model.named_parameters())
    expected = EXPECTED[arch](model, HEADS, kv)

    restriction = HeadRestriction(model, HEADS, kv=kv).apply()
    trainable = restriction.trainable_parameters()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    assert len(trainable) == len({id(p) for p in trainable})
    opt = _train(model, trainable, steps=4, weight_decay=0.1)

    # While restricted, the base tensors themselves never change and never receive a gradient.
    for name, p in params_before.items():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    # Optimizer state exists only for the deltas, in proportion to the trained entries.
    state = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
    assert state == 2 * restriction.count_trainable()
    assert restriction.count_trainable() == sum(int(m.sum()) for m in expected.values())

    restricted_logits = _logits(model)
    restriction.merge()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, mask in expected.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), f"{name} moved outside the selection"
        assert (after[name][mask] != before[name][mask]).all(), f"{name} did not train everywhere inside"
    torch.testing.assert_close(_logits(model), restricted_logits, atol=1e-5, rtol=0)


def test_counts_and_describe_llama_gqa():
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    r = HeadRestriction(model, HEADS, kv="group").apply()
    d = r.describe()
    # 3 heads: q rows and o columns of 8 x 32 each; KV groups (0,0) and (1,1): k and v rows 8 x 32.
    assert d["by_kind"] == {"q": 768, "k": 512, "v": 512, "o": 768, "norm": 0, "mlp": 0}
    assert d["trainable"] == r.count_trainable() == 2560
    assert d["total"] == total and d["fraction"] == pytest.approx(2560 / total)
    assert d["heads"] == 3 and d["kv_groups"] == 2 and d["kv_policy"] == "group"
    assert r.kv_groups == [(0, 0), (1, 1)]
    r.remove()
    r = HeadRestriction(model, HEADS, kv="none").apply()
    assert r.describe()["by_kind"] == {"q": 768, "k": 0, "v": 0, "o": 768, "norm": 0, "mlp": 0}
    assert r.count_trainable() == 1536


def test_biases_are_trained_per_head():
    # Qwen2 has q/k/v biases: a head adds its 8 bias entries, a KV group 8 + 8.
    model = tiny_model("qwen2")
    r = HeadRestriction(model, [(0, 0)], kv="group").apply()
    assert r.describe()["by_kind"] == {"q": 264, "k": 264, "v": 264, "o": 256, "norm": 0, "mlp": 0}


def test_every_head_uses_whole_tensor_deltas():
    model = tiny_model("llama")
    heads = [(l, h) for l in range(2) for h in range(4)]
    r = HeadRestriction(model, heads).apply()
    deltas = [m for m in model.modules() if isinstance(m, HeadDelta)]
    assert deltas and all(d.index is None for d in deltas)
    attn = sum(p.numel() for n, p in dict(r.model.named_parameters()).items() if "self_attn" in n and "original" in n)
    assert r.count_trainable() == attn == 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_norms_and_mlp_train_whole(arch):
    model = tiny_model(arch)
    before = _snapshot(model)
    r = HeadRestriction(model, [(0, 0)], train_norms=True, train_mlp=True).apply()
    counts = r.describe()["by_kind"]
    if arch == "llama":  # 2 RMSNorms per layer + final norm (32 each); gate/up/down 32x64 each
        assert counts["norm"] == 5 * 32 and counts["mlp"] == 2 * 3 * 32 * 64
    else:  # ln_1, ln_2 per layer + ln_f (weight + bias); c_fc and c_proj with biases
        assert counts["norm"] == 5 * 64 and counts["mlp"] == 2 * (32 * 64 + 64 + 64 * 32 + 32)
    assert r.count_trainable() == sum(counts.values())
    _train(model, r.trainable_parameters())
    r.merge()
    for name, p in model.named_parameters():
        trained = any(k in name for k in ("norm", "ln_", "mlp")) or (".0." in name and "attn" in name)
        if not trained:
            assert torch.equal(p, before[name]), name
        elif "mlp" in name or "norm" in name or "ln_" in name:
            assert (p != before[name]).all(), name


def test_fresh_restriction_is_exactly_the_base_model():
    model = tiny_model("llama")
    base = _logits(model)
    HeadRestriction(model, HEADS, train_norms=True).apply()
    assert torch.equal(_logits(model), base)


def test_merge_exports_a_plain_model_that_reloads(tmp_path):
    model = tiny_model("llama")
    classes = {n: type(m) for n, m in model.named_modules()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    r = HeadRestriction(model, HEADS).apply()
    _train(model, r.trainable_parameters())
    restricted = _logits(model)

    r.merge()
    assert {n: type(m) for n, m in model.named_modules()} == classes  # parametrized classes undone
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(_logits(reloaded), restricted, atol=1e-5, rtol=0)
    assert not torch.equal(_logits(tiny_model("llama")), restricted)  # training did change the model


def test_merge_gpt2_fused_and_tied_export(tmp_path):
    model = tiny_model("gpt2")
    r = HeadRestriction(model, [(1, 0), (1, 3)]).apply()
    _train(model, r.trainable_parameters())
    restricted = _logits(model)
    r.merge().save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    torch.testing.assert_close(_logits(reloaded), restricted, atol=1e-5, rtol=0)


def test_state_dict_resume_restores_deltas():
    model = tiny_model("llama")
    r = HeadRestriction(model, HEADS, train_norms=True).apply()
    _train(model, r.trainable_parameters())
    trained = _logits(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)

    fresh = tiny_model("llama")
    HeadRestriction(fresh, HEADS, train_norms=True).apply()
    assert not torch.equal(_logits(fresh), trained)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(_logits(fresh), trained)

    # Same number of trained entries but other heads: refused, not silently mis-applied.
    other = tiny_model("llama")
    HeadRestriction(other, [(0, 0), (1, 0), (1, 1)], train_norms=True).apply()
    buffer.seek(0)
    with pytest.raises(ConfigError, match="different head selection"):
        other.load_state_dict(torch.load(buffer, weights_only=True))


def test_remove_restores_the_exact_model():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a user-frozen tensor stays frozen
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    r = HeadRestriction(model, HEADS).apply()
    _train(model, r.trainable_parameters())
    r.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not any(isinstance(m, HeadDelta) for m in model.modules())


def test_parameters_keep_identity_through_merge():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    r = HeadRestriction(model, HEADS).apply()
    _train(model, r.trainable_parameters(), steps=1)
    r.merge()
    assert model.model.layers[0].self_attn.q_proj.weight is q


@pytest.mark.parametrize("arch", ARCHS)
def test_all_architectures_train_only_layout_slices(arch):
    # The same check the architecture sweep runs on every model type: AdamW with weight decay moves
    # every entry of the selected heads' slices and nothing else.
    model = tiny_model(arch)
    arch_sweep.check_restricted_training(model, find_heads(model), sft_batch(seed=3))


def test_errors():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="'group'"):
        HeadRestriction(model, HEADS, kv="all")
    with pytest.raises(ConfigError, match="out of range"):
        HeadRestriction(model, [(2, 0)]).apply()
    with pytest.raises(ConfigError, match="empty"):
        HeadRestriction(model, []).apply()
    with pytest.raises(ConfigError, match="call apply"):
        HeadRestriction(model, HEADS).merge()
    r = HeadRestriction(model, HEADS).apply()
    with pytest.raises(ConfigError, match="already"):
        HeadRestriction(model, HEADS).apply()
    with pytest.raises(ConfigError, match="already"):
        r.apply()
    r.merge()
    with pytest.raises(ConfigError, match="call apply"):
        r.count_trainable()
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_still_trains_the_deltas():
    # Reentrant checkpointing drops gradients when no block input requires grad, which is the case
    # once embeddings are frozen; the deltas must still get gradients.
    model = tiny_model("llama")
    model.train()
    r = HeadRestriction(model, HEADS).apply()
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model(**sft_batch()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.trainable_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_all_architectures_merge_norms_and_mlp(arch):
    model = tiny_model(arch)
    r = HeadRestriction(model, [(1, 1)], train_norms=True, train_mlp=True).apply()
    counts = r.describe()["by_kind"]
    assert counts["norm"] > 0 and counts["mlp"] > 0 and counts["q"] > 0
    with torch.no_grad():
        for i, p in enumerate(r.trainable_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    restricted = _logits(model)
    r.merge()
    torch.testing.assert_close(_logits(model), restricted, atol=1e-5, rtol=0)
