"""`lit_heads plan`: exact trainable counts against arithmetic written out here and against a real
HeadRestriction, per-device sharding against world size, the activation formula against the tensors a
real forward pass keeps, and clear errors for bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_heads.analysis import memory_plan as mp
from lit_heads.cli import main as cli_main
from lit_heads.commands.compare import parse_arm
from lit_heads.commands.plan import main as plan_main

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def written_out_total(c: dict) -> int:
    """Parameters of a Llama-style decoder from its config, shape by shape."""
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    q = o = c["num_attention_heads"] * head_dim * h
    k = v = c["num_key_value_heads"] * head_dim * h
    bias = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim if c["model_type"] == "qwen2" else 0
    mlp = 3 * h * i  # gate, up, down
    norms = 2 * h
    embeddings = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return embeddings + layers * (q + k + v + o + bias + mlp + norms) + h  # + final norm


PUBLISHED = {  # total parameters as published for each model
    "llama-2-7b.json": 6_738_415_616,
    "llama-3-8b.json": 8_030_261_248,
    "mistral-7b.json": 7_241_732_096,
    "qwen2.5-7b.json": 7_615_616_512,
}


def facts_of(path) -> mp.ModelFacts:
    config, _ = mp.load_config(str(path))
    return mp.model_facts(mp.meta_model(config))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_give_the_published_parameter_counts(name):
    facts = facts_of(MODELS / name)
    raw = json.loads((MODELS / name).read_text())
    assert facts.total == PUBLISHED[name] == written_out_total(raw)


def test_llama3_8b_full_count_is_the_sum_of_its_layer_shapes():
    facts = facts_of(MODELS / "llama-3-8b.json")
    layer = 4096 * 4096 + 1024 * 4096 + 1024 * 4096 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert facts.layer_params == [layer] * 32
    assert facts.outside_layers == 2 * 128256 * 4096 + 4096
    (count,) = mp.count_arms(None, facts, [parse_arm("full")], kv="none")
    assert count.low == count.high == 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248


@pytest.fixture(scope="module")
def llama3_two_layers(tmp_path_factory) -> Path:
    """Llama-3-8B's shapes with 2 decoder layers: every layer is a real Llama-3-8B layer, and head arms
    count in seconds."""
    raw = json.loads((MODELS / "llama-3-8b.json").read_text())
    path = tmp_path_factory.mktemp("llama3-2l") / "config.json"
    path.write_text(json.dumps({**raw, "num_hidden_layers": 2}))
    return path


def run_plan(capsys, *argv) -> tuple[list, str]:
    plans = plan_main(list(argv))
    return plans, capsys.readouterr().out


def test_top_k_with_kv_none_is_exact_and_equals_q_rows_plus_o_columns(llama3_two_layers, capsys):
    plans, out = run_plan(capsys, "--model", str(llama3_two_layers), "--arms", "top:5", "top:0.1", "--kv", "none")
    q_rows_plus_o_cols = 128 + 128  # head_dim rows of q_proj and head_dim columns of o_proj, each of length hidden
    assert plans[0].count.low == plans[0].count.high == 5 * q_rows_plus_o_cols * 4096 == 5_242_880
    assert plans[1].count.n_heads == round(0.1 * 2 * 32) == 6
    assert plans[1].count.low == plans[1].count.high == 6 * q_rows_plus_o_cols * 4096
    assert plans[0].count.by_kind == {"q": 5 * 128 * 4096, "k": 0, "v": 0, "o": 5 * 128 * 4096, "norm": 0, "mlp": 0}
    assert "trains 5,242,880 (" in out and "exact" in out


def test_top_k_with_kv_group_gives_the_range_over_placements(llama3_two_layers, capsys):
    plans, out = run_plan(capsys, "--model", str(llama3_two_layers), "--arms", "top:5", "--kv", "group")
    heads = 5 * (128 + 128) * 4096
    kv_group = 2 * 128 * 4096  # k and v rows of one KV group (4 query heads share it)
    count = plans[0].count
    assert count.low == heads + math.ceil(5 / 4) * kv_group == 7_340_032  # packed into 2 groups
    assert count.high == heads + 5 * kv_group == 10_485_760  # one group each
    assert count.kv_groups == (2, 5) and not count.exact
    assert "7,340,032 to 10,485,760" in out and "depends on which heads the data picks" in out


def test_top_k_with_a_scores_file_is_exact(llama3_two_layers, tmp_path, capsys):
    from lit_heads.heads.pattern import Pattern
    from lit_heads.heads.selection import select_heads

    scores = torch.rand(2, 32, generator=torch.Generator().manual_seed(3))
    Pattern(scores).save(tmp_path / "ap.safetensors")
    plans, _ = run_plan(capsys, "--model", str(llama3_two_layers), "--arms", "top:7", "bottom:7",
                        "--scores", str(tmp_path / "ap.safetensors"))
    for plan, strategy in zip(plans, ("top", "bottom")):
        heads = select_heads(strategy, 2, 32, top_k=7, scores=scores)
        groups = {(layer, head // 4) for layer, head in heads}
        assert plan.count.exact
        assert plan.count.high == 7 * 256 * 4096 + len(groups) * 2 * 128 * 4096


@pytest.fixture
def full_llama3():
    facts = facts_of(MODELS / "llama-3-8b.json")
    (count,) = mp.count_arms(None, facts, [parse_arm("full")], kv="none")
    return facts, count


def parts(facts, count, **run) -> dict[str, int]:
    plan = mp.plan_arm(facts, count, mp.RunShape(**run), memory=80 * 10**9)
    return {p.name: p.bytes for p in plan.parts}


def test_fsdp_shards_weights_gradients_and_optimizer_over_the_world_size(full_llama3):
    facts, count = full_llama3
    n = 8_030_261_248
    one = parts(facts, count, strategy="fsdp", devices=1, precision="bf16-mixed")
    assert (one["weights"], one["gradients"], one["optimizer state"]) == (n * 4, n * 4, n * 8)
    for devices, nodes in ((8, 1), (4, 2), (3, 1)):
        world = devices * nodes
        split = parts(facts, count, strategy="fsdp", devices=devices, num_nodes=nodes, precision="bf16-mixed")
        shard = -(-n // world)  # ceil: FSDP pads the flat parameter to a multiple of the world size
        assert (split["weights"], split["gradients"], split["optimizer state"]) == (shard * 4, shard * 4, shard * 8)
        assert split["activations"] == one["activations"]  # data parallel: activations are per device, never split
    bf16 = parts(facts, count, strategy="fsdp", devices=8, precision="bf16-true")
    shard = -(-n // 8)
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer state"]) == (shard * 2, shard * 2, shard * 4)


def test_ddp_and_deepspeed_stages_shard_what_they_shard(full_llama3):
    facts, count = full_llama3
    n, shard = 8_030_261_248, -(-8_030_261_248 // 8)
    ddp = parts(facts, count, strategy="ddp", devices=8, precision="32-true")
    assert (ddp["weights"], ddp["gradients"], ddp["ddp buckets"]) == (n * 4, n * 4, n * 4)
    assert ddp["optimizer state"] == n * 8
    # ZeRO's mixed-precision layout: 2-byte weights and gradients, fp32 master + 2 fp32 states = 12 bytes.
    z1 = parts(facts, count, strategy="deepspeed_stage_1", devices=8, precision="bf16-mixed")
    assert (z1["weights"], z1["gradients"], z1["optimizer state"]) == (n * 2, n * 2, shard * 12)
    z2 = parts(facts, count, strategy="deepspeed_stage_2", devices=8, precision="bf16-mixed")
    assert (z2["weights"], z2["gradients"], z2["optimizer state"]) == (n * 2, shard * 2, shard * 12)
    z3 = parts(facts, count, strategy="deepspeed_stage_3", devices=8, precision="bf16-mixed")
    assert (z3["weights"], z3["gradients"], z3["optimizer state"]) == (shard * 2, shard * 2, shard * 12)


def test_auto_is_a_single_device_on_one_device_and_ddp_on_more(full_llama3):
    facts, count = full_llama3
    assert mp.RunShape(strategy="auto", devices=1).strategy == "single_device"
    assert mp.RunShape(strategy="auto", devices=1, num_nodes=2).strategy == "ddp"
    one = parts(facts, count, strategy="auto", devices=1, precision="bf16-mixed")
    two = parts(facts, count, strategy="auto", devices=2, precision="bf16-mixed")
    assert "ddp buckets" not in one and two["ddp buckets"] == 8_030_261_248 * 4
    assert {k: v for k, v in two.items() if k != "ddp buckets"} == one


def test_peak_is_persistent_parts_plus_the_larger_transient(full_llama3):
    facts, count = full_llama3
    plan = mp.plan_arm(facts, count, mp.RunShape(strategy="fsdp", devices=8), memory=80 * 10**9)
    p = {x.name: x.bytes for x in plan.parts}
    assert plan.peak == p["weights"] + p["gradients"] + p["optimizer state"] + max(
        p["weight copies"] + p["activations"], p["optimizer step"])
    assert plan.fits and plan.peak < 80 * 10**9
    small = mp.plan_arm(facts, count, mp.RunShape(strategy="fsdp", devices=8), memory=10 * 10**9)
    assert not small.fits


def test_plan_counts_what_a_real_head_restriction_trains(tiny_llama_dir, tmp_path, capsys):
    """On a real (non-meta) tiny Llama with GQA: plan's count for each arm equals the scalars that
    HeadRestriction makes trainable and that one AdamW step actually changes."""
    from lit_heads.heads.restrict import HeadRestriction
    from lit_heads.heads.selection import save_head_list, select_heads
    from lit_heads.models import load_model

    save_head_list(tmp_path / "heads.txt", [(0, 0), (0, 3), (1, 1)])
    arms = ["full", "random:3", "random:0.5", f"list:{tmp_path / 'heads.txt'}"]
    for kv in ("group", "none"):
        plans, _ = run_plan(capsys, "--model", str(tiny_llama_dir), "--arms", *arms, "--kv", kv, "--seed", "4")
        real = load_model(str(tiny_llama_dir))
        assert plans[0].count.high == sum(p.numel() for p in real.parameters())
        selections = [select_heads("random", 2, 4, top_k=3, seed=4), select_heads("random", 2, 4, fraction=0.5, seed=4),
                      [(0, 0), (0, 3), (1, 1)]]
        for plan, heads in zip(plans[1:], selections):
            model = copy.deepcopy(real)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            restriction = HeadRestriction(model, heads, kv=kv).apply()
            assert plan.count.exact
            assert plan.count.high == sum(p.numel() for p in model.parameters() if p.requires_grad)
            optimizer = torch.optim.AdamW(restriction.trainable_parameters(), lr=1e-2)
            ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            restriction.merge()
            changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
            assert changed == plan.count.high


# ---- activations: the formula against the tensors a real forward pass keeps -------------------------


def saved_bytes(model, batch: int, seq: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded)."""
    from lit_heads.module import response_loss

    ids = torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        response_loss(logits, ids)
    return sum(seen.values())


def per_token_and_fixed(model, autocast: bool, seq: int = 64) -> tuple[float, float]:
    """Saved bytes per token (slope over the batch size) and the part that does not grow with tokens."""
    one, three = saved_bytes(model, 1, seq, autocast), saved_bytes(model, 3, seq, autocast)
    slope = (three - one) / (2 * seq)
    return slope, one - slope * seq


def tiny_gqa_llama(dtype):
    from tiny_models import tiny_model

    # head_dim 12 x 6 heads = 72 != hidden 48 and intermediate 72: a formula mixing them up shows.
    model = tiny_model("llama", attn_implementation="sdpa", dtype=dtype, hidden_size=48, intermediate_size=72,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=12, num_hidden_layers=3)
    return model.train()


PRECISION_CASES = [("32-true", torch.float32, False), ("bf16-true", torch.bfloat16, False),
                   ("bf16-mixed", torch.float32, True)]


@pytest.mark.parametrize("precision,dtype,autocast", PRECISION_CASES, ids=[c[0] for c in PRECISION_CASES])
@pytest.mark.parametrize("arm", ["full", "kv-none", "kv-group", "full-ckpt", "kv-none-ckpt"])
def test_activation_formula_matches_the_tensors_a_forward_pass_keeps(precision, dtype, autocast, arm):
    from lit_heads.heads.restrict import HeadRestriction

    model = tiny_gqa_llama(dtype)
    facts = mp.model_facts(model)
    kv = "group" if arm == "kv-group" else "none"
    full = arm.startswith("full")
    if not full:
        HeadRestriction(model, [(layer, 1) for layer in range(3)], kv=kv).apply()  # a head in every layer
    checkpointing = arm.endswith("ckpt")
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured, _ = per_token_and_fixed(model, autocast)
    per = mp.activation_bytes_per_token(facts.dims, precision, "ddp", full, kv, checkpointing)
    kept_logits = 4 * facts.dims.vocab  # fp32 log-probabilities; the rest of LOGIT_BYTES are backward's gradients
    expected = 3 * per["stored_layer"] + per["rest"] + kept_logits
    # What remains is the causal shift: the last position has no label (4 x vocab / seq bytes).
    assert abs(measured - expected) <= 0.01 * expected, (measured, expected)


@pytest.mark.parametrize("kv", ["none", "group"])
def test_weight_copies_bound_what_backward_keeps(kv):
    """32-true head arm: each restricted weight is kept as W + delta for backward (the plan's copies are an
    upper bound: layer 0's q/k/v get an input that needs no gradient and keep nothing). ddp + bf16-mixed
    full arm: autocast keeps a bf16 copy of every linear weight, exactly."""
    from lit_heads.heads.restrict import HeadRestriction

    _, baseline = per_token_and_fixed(tiny_gqa_llama(torch.float32), autocast=False)  # cos/sin and scalars
    model = tiny_gqa_llama(torch.float32)
    facts = mp.model_facts(model)
    heads = [(layer, 1) for layer in range(3)]
    restriction = HeadRestriction(model, heads, kv=kv).apply()
    _, fixed = per_token_and_fixed(model, autocast=False)
    restriction.remove()
    # The plan's side comes from count_arms on the meta model of the same config, not from the lines above.
    meta = mp.meta_model(model.config)
    meta_facts = mp.model_facts(meta)
    (count,) = mp.count_arms(meta, meta_facts, [parse_arm(f"list:{_head_file(heads)}")], kv=kv)
    copies = parts(meta_facts, count, precision="32-true")["weight copies"]
    assert 0.75 * copies <= fixed - baseline <= copies

    _, fixed = per_token_and_fixed(tiny_gqa_llama(torch.float32), autocast=True)
    (count,) = mp.count_arms(None, facts, [parse_arm("full")], kv=kv)
    copies = parts(facts, count, precision="bf16-mixed", strategy="ddp")["weight copies"]
    assert copies == 2 * facts.linear_weights
    assert abs((fixed - baseline) - copies) <= 0.01 * copies


def _head_file(heads) -> str:
    import tempfile

    from lit_heads.heads.selection import save_head_list

    path = Path(tempfile.mkdtemp()) / "heads.json"
    save_head_list(path, heads)
    return str(path)


# ---- input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("80 GiB", 80 * 2**30), ("141gb", 141 * 10**9),
                                           ("24576MiB", 24 * 2**30), ("1.5TB", 1.5e12), ("1000", 1000)])
def test_memory_sizes_parse(text, expected):
    assert mp.parse_memory(text) == expected


def test_a_hf_directory_and_its_bare_config_json_agree(tmp_path):
    """A bare config.json and the HF directory holding it give the same facts."""
    (tmp_path / "model").mkdir()
    raw = json.loads((MODELS / "mistral-7b.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(raw))
    from_dir, from_file = facts_of(tmp_path / "model"), facts_of(MODELS / "mistral-7b.json")
    assert from_dir.total == from_file.total == PUBLISHED["mistral-7b.json"]


def test_a_fit_checkpoint_plans_its_base_model(tiny_llama_dir, tmp_path, capsys):
    torch.save({"hyper_parameters": {"model": str(tiny_llama_dir)}, "state_dict": {}}, tmp_path / "run.ckpt")
    from_ckpt, _ = run_plan(capsys, "--model", str(tmp_path / "run.ckpt"), "--arms", "full")
    from_dir, _ = run_plan(capsys, "--model", str(tiny_llama_dir), "--arms", "full")
    assert from_ckpt[0].count.high == from_dir[0].count.high == facts_of(tiny_llama_dir).total > 0


def _without(tmp_path, key) -> str:
    raw = json.loads((MODELS / "llama-3-8b.json").read_text())
    del raw[key]
    path = tmp_path / f"no-{key}.json"
    path.write_text(json.dumps(raw))
    return str(path)


BAD = {
    "unknown arm": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--arms", "full", "middle:3"],
                    ["Cannot read arm 'middle:3'", "'full'"]),
    "missing KV heads": (lambda tmp: ["--model", _without(tmp, "num_key_value_heads"), "--arms", "full"],
                         ["does not give num_key_value_heads", "published config.json"]),
    "missing query heads": (lambda tmp: ["--model", _without(tmp, "num_attention_heads"), "--arms", "full"],
                            ["does not give num_attention_heads"]),
    "fraction out of range": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--arms", "top:1.5"],
                              ["fraction=1.5 is out of range", "at most 1"]),
    "count out of range": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--arms", "random:5000"],
                           ["top_k=5000 is out of range", "= 1024 heads"]),
    "unknown strategy": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--strategy", "zero"],
                         ["Unknown strategy 'zero'", "fsdp"]),
    "unknown precision": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--precision", "bf16"],
                          ["Unknown precision 'bf16'", "bf16-mixed"]),
    "hub id": (lambda tmp: ["--model", "meta-llama/Meta-Llama-3-8B"], ["without downloading", "config.json"]),
    "bad memory": (lambda tmp: ["--model", str(MODELS / "llama-3-8b.json"), "--memory", "lots"], ["not a memory size"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error_with_exit_2(case, tmp_path, capsys):
    build, expected = BAD[case]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", *build(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("lit_heads: error: ") and err.count("\n") == 1, err  # one paragraph
    missing = [s for s in expected if s not in err]
    assert not missing, f"message lacks {missing}:\n{err}"


@pytest.mark.slow
def test_unknown_arm_exits_2_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli", "plan", "--model", str(MODELS / "llama-3-8b.json"),
                             "--arms", "sideways:0.1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "lit_heads: error: Cannot read arm 'sideways:0.1'" in result.stderr and "Traceback" not in result.stderr


# ---- the bundled model -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_bundled_gguf_plans_from_metadata_with_the_counts_real_fits_printed(capsys):
    """SmolLM2-135M from its GGUF metadata: the total and the random:0.1 count equal what real fits
    printed (README compare table, seed 0, kv=group), and top:0.1's range contains the real fit's count."""
    plans, out = run_plan(capsys, "--model", "smollm2-135m", "--arms", "full", "random:0.1", "top:0.1", "--kv", "group")
    assert "GGUF metadata only" in out
    full, random_arm, top = (p.count for p in plans)
    assert full.high == 134_515_008
    assert random_arm.exact and random_arm.high == 3_833_856
    assert top.low <= 3_465_216 <= top.high and not top.exact
