"""Every causal-LM model type of the installed transformers, tiny and random, through lit_heads.

The list is transformers' own `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, not a hand-picked one. For each
type `check(model_type)` builds a tiny config (hidden 64, 2 layers; a generic builder over the config
class's fields, with per-type fixes in `CONFIG_FIXES` only where a class needs them), then:

1. `find_heads` discovers the layout, and the layout is checked against the model's own forward
   pass through its *weights* (not the output hook the discovery probe uses): perturbing one head's
   q slices changes only that head's columns of the output projection's input, one KV group's k/v
   slices only that group's heads, zeroing a head's o columns equals zeroing its input block, and
   the q/k/v/o slices partition the projections' weights;
2. `compute_ap` (the model's default attention kernel) is compared with the Γ-based reference of
   tests/ap_reference.py on a right-padded batch of 3 samples: max relative error <= 1e-4;
3. three AdamW steps with weight decay under `HeadRestriction` move exactly the layout's slices of
   the selected heads (and their KV groups) and nothing else, bit for bit.

Each type ends as "exact", "n/a" (find_heads refuses it, for the reason in `NOT_APPLICABLE`), or
"xfail" (documented in `XFAIL`). tests/test_architectures.py runs it; scripts/architectures_table.py
writes the table into README.md.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ap_reference import max_rel_err, reference_ap_of
from lit_heads.heads.layout import HeadsNotFound, find_heads
from lit_heads.heads.lm_loss import DEFAULT_CHUNK_SIZE
from lit_heads.heads.restrict import HeadRestriction
from lit_heads.heads.scoring import compute_ap, per_sample_loss
from tiny_models import sft_batch

MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
VOCAB = 128
AP_TOLERANCE = 1e-4

# Set on every config class that has the field (directly or through its attribute_map).
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, max_position_embeddings=64,
    # encoder-decoder families: their *ForCausalLM is the decoder stack alone
    decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2, encoder_attention_heads=4,
    encoder_ffn_dim=128,
    # other names of the feed-forward width
    n_inner=128, ffn_dim=128, d_ff=128, ffn_hidden_size=128,
    # mixture of experts: few, small experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, moe_num_experts=4, moe_k=2, n_group=1, topk_group=1,
    # multi-head latent attention (DeepSeek): small ranks
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    index_head_dim=16, index_n_heads=2, index_topk=4,
    # per-layer token embeddings (Gemma 3n / 4)
    vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
    # partial rotary embeddings that fit in head_dim 16
    rotary_dim=8,
    # BERT-style families are decoders only when asked to be
    is_decoder=True,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    sliding_window=4,
)

# Per-type fields where the generic builder is not enough (a field with another meaning, a list
# sized by the layer count, a validator). Values override TINY.
CONFIG_FIXES: dict[str, dict] = {
    "big_bird": dict(attention_type="original_full"),  # block-sparse attention needs 700+ tokens
    "cohere_compass_text": dict(layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
        sliding_attention=dict(rope_type="default", rope_theta=10000.0),
        full_attention=dict(rope_type="default", rope_theta=10000.0))),
    "dbrx": dict(d_model=64, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=64, ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "dots3_note": dict(text_config=dict(num_key_value_heads=4)),
    "dots3_note_text": dict(num_key_value_heads=4),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=4),
    # Gemma 3n's last layers reuse the keys and values of earlier ones, as in the released models.
    "gemma3n_text": dict(num_hidden_layers=3, num_kv_shared_layers=1, altup_num_inputs=2, laurel_rank=8,
                         layer_types=["sliding_attention", "full_attention", "full_attention"],
                         activation_sparsity_pattern=[0.0, 0.0, 0.0]),
    # The released LFM2 models mix short convolutions with attention (the config class defaults to
    # attention only).
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    # Llama 3.2 Vision's text decoder: image cross-attention layers between self-attention ones.
    "mllama": dict(text_config=dict(cross_attention_layers=[1])),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=8),
    "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4, layer_types=["linear_attention", "full_attention"]),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=16),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=4),
    "nemotron_h": dict(hybrid_override_pattern="M*"),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=64),
    "xmod": dict(default_language="en_XX"),
    "xlnet": dict(d_head=16, d_inner=128, attn_type="uni"),
    "zamba": dict(layers_block_type=["mamba", "hybrid"], attention_head_dim=16, mamba_d_state=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=4, mamba_d_state=8, chunk_size=4,
                   intermediate_size=128, adapter_rank=8),
    "zaya": dict(num_experts_per_tok=1),
    "longcat_flash": dict(num_layers=1, num_key_value_heads=4, qk_head_dim=16),
    "blt": dict(encoder_hash_byte_group_vocab=64, patching_mode="space", patch_in_forward=False),
    "gemma4_assistant": dict(text_config=dict(
        model_type="gemma4_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0), backbone_hidden_size=64,
                             num_centroids=8, centroid_intermediate_top_k=2),
    "reformer": dict(attention_head_size=16, attn_layers=["local", "local"], axial_pos_shape=[8, 8],
                     axial_pos_embds_dim=[32, 32], local_attn_chunk_length=4, feed_forward_size=128),
}

# model_type -> the `HeadsNotFound.kind` find_heads must raise, and why refusing is right.
_MLA = "multi-head latent attention: all heads share low-rank compressed query and key/value projections"
_SSM = "no attention: a state-space model"
_HYBRID = "hybrid: some layers have no softmax attention (patterns are layers x heads over every layer)"
_LINEAR = "hybrid: linear-attention layers next to softmax attention"
NOT_APPLICABLE: dict[str, tuple[str, str]] = {
    **{mt: ("heads mixed", _MLA) for mt in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32",
                                             "glm4_moe_lite", "glm_moe_dsa", "hy_v4", "minicpm3", "sarvam_mla",
                                             "youtu")},
    **{mt: ("no attention", _SSM) for mt in ("falcon_mamba", "mamba", "mamba2")},
    "xlstm": ("no attention", "no attention: a recurrent model (xLSTM)"),
    "xlnet": ("no attention", "two-stream relative attention written with bare weight tensors, no projection modules"),
    "rwkv": ("no heads", "no attention heads: RWKV's time mixing is recurrent"),
    **{mt: ("hybrid", _HYBRID) for mt in ("bamba", "granitemoehybrid", "jamba", "lara_mini", "lfm2", "lfm2_moe", "lfm3",
                                          "nemotron_h", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text",
                                          "qwen3_next", "recurrent_gemma", "zamba", "zamba2")},
    **{mt: ("heads mixed", _LINEAR) for mt in ("bailing_hybrid", "kimi_linear", "minimax", "olmo_hybrid")},
    "bitnet": ("heads mixed", "a norm over all heads (`attn_sub_norm`) sits between the heads and `o_proj`"),
    "dory": ("heads mixed", "a norm over all heads (`attn_sub_norm`) sits between the heads and `o_proj`"),
    "diffllama": ("heads mixed",
                  "differential attention: heads are subtracted in pairs and normalised before `o_proj`"),
    "prophetnet": ("heads mixed", "encoder-decoder n-gram decoder whose relative-position projection spans heads"),
    "doge": ("unsupported", "dynamic-mask attention: a mask projection from the values that feeds no single head"),
    "jetmoe": ("unsupported", "mixture of attention heads: q and o projections are routed experts"),
    "hrm_text": ("unsupported", "two decoder stacks (HRM's high- and low-level modules) run in a loop"),
    "zaya": ("unsupported", "a delayed value projection run one token at a time"),
    "inkling_text": ("unsupported", "sliding layers compute more, narrower heads than the config counts"),
    "inkling2_text": ("unsupported", "sliding layers compute more, narrower heads than the config counts"),
    "inkling2_loop_text": ("unsupported", "sliding layers compute more, narrower heads than the config counts"),
    "gemma3n_text": ("unsupported", "KV-sharing layers reuse the keys and values of earlier layers"),
    "mllama": ("unsupported", "image cross-attention layers do not run on text"),
    "gemma4_assistant": ("not runnable", "a drafting assistant: runs on the target model's hidden states"),
    "gemma4_unified_assistant": ("not runnable", "a drafting assistant: runs on the target model's hidden states"),
}

# model_type -> why it does not pass (each is a known limitation, stated in the README table).
_NO_CONFIG = "no tiny config of this class builds and runs offline: "
# Model types whose forward turns the decoder's output into logits in a way the chunked loss does not
# reproduce: lit_heads refuses them on the chunked path (HeadNotReproducible), so their AP is checked
# on the plain path (`loss_chunk_size: 0`, the fix the refusal names). tests/test_lm_loss.py checks the refusal.
PLAIN_LOSS: dict[str, str] = {
    "prophetnet": "the n-gram decoder's forward predicts from streams other than the decoder's first output",
    "xlm": "the head (`pred_layer`) returns a tuple, not logits",
}

XFAIL: dict[str, str] = {
    "blt": _NO_CONFIG + "the byte-patcher and the encoder/global/decoder sub-configs need matching sizes",
    "cpmant": "CPM-Ant's `output_attentions` returns a slice of Γ cut after its use (prompt positions dropped), "
              "so the reference's Σ Γ·∂L/∂Γ through it is zero",
    "deepseek_v4": _NO_CONFIG + "grouped low-rank output projection sizes",
    "dots3_note": _NO_CONFIG + "per-layer configs with fixed layer indices",
    "dots3_note_text": _NO_CONFIG + "per-layer configs with fixed layer indices",
    "gemma3n": "the vision tower needs the `timm` package, which is not installed (the decoder is `gemma3n_text`)",
    "longcat_flash": _NO_CONFIG + "latent-attention sizes",
    "musicgen": "inputs are audio codebooks ([batch x codebooks, seq]), not token ids",
    "musicgen_melody": "inputs are audio codebooks ([batch x codebooks, seq]), not token ids",
    "qwen4_exp": _NO_CONFIG + "n-gram and indexer fields without defaults",
    "qwen4_exp_text": _NO_CONFIG + "n-gram and indexer fields without defaults",
    "reformer": "reversible layers run forward without autograd and recompute it in their own backward, so the "
                "output projection's input is outside the graph",
}


def _fields(cls) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", {}))


def _layer_types(default) -> list[str] | None:
    kinds = list(dict.fromkeys(getattr(default, "layer_types", None) or []))
    if not kinds:
        return None
    # Both kinds where a model mixes them (sliding + full attention; or a hybrid's two block kinds).
    return (kinds * 2)[:2]


def _merge(base: dict, fix: dict) -> dict:
    out = dict(base)
    for k, v in fix.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_kwargs(cls, model_type: str | None = None, depth: int = 0) -> dict:
    """Constructor arguments of a tiny version of config class `cls`."""
    fields = _fields(cls)
    kw = {k: v for k, v in TINY.items() if k in fields}
    amap = getattr(cls, "attribute_map", {})
    if amap.get("num_key_value_heads", 1) == amap.get("num_attention_heads", 2):
        kw.pop("num_key_value_heads", None)  # both names point at one field (Whisper): keep the head count
    if "kv_lora_rank" in fields and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # latent attention: one KV head per head
    default = None
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - some classes need arguments; their fixes supply them
        pass
    if default is not None:
        types = _layer_types(default)
        declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if types is not None and "layer_types" in declared:  # a real field, not a property
            kw["layer_types"] = types
        if getattr(default, "sliding_window", 1) is None:
            kw.pop("sliding_window", None)  # off by default: leave it off
        for name in getattr(cls, "sub_configs", {}) or {}:
            sub = getattr(default, name, None)
            if isinstance(sub, PreTrainedConfig) and depth < 3:
                kw[name] = {**tiny_kwargs(type(sub), None, depth + 1), "model_type": sub.model_type}
    if model_type is not None:
        kw = _merge(kw, CONFIG_FIXES.get(model_type, {}))
    return kw


def tiny_config(model_type: str):
    cls = CONFIG_MAPPING[model_type]
    return cls(**tiny_kwargs(cls, model_type))


def tiny_model(model_type: str, seed: int = 0):
    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)  # HF zero-initialises biases, which would hide bias-row slice bugs
    return model.eval()


def batch_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    vocab = model.get_input_embeddings().num_embeddings
    return sft_batch(lengths=(9, 6, 4), prompt_lengths=(3, 2, 1), vocab=min(vocab, 100), seed=seed)


# ------------------------------------------------------------------------------------------------
# checks


def head_inputs(model, layout, input_ids):
    """Inputs of every layer's output projection, viewed [B, T, H, hd]."""
    got = {}
    hooks = [
        lh.o_proj.register_forward_pre_hook(lambda m, args, i=lh.index: got.setdefault(i, args[0].detach().clone()))
        for lh in layout.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    B = input_ids.shape[0]
    # view(B, -1, ...): a model may prepend tokens of its own (CPM-Ant's learned prompt)
    return [got[i].view(B, -1, layout.n_heads, lh.head_dim) for i, lh in enumerate(layout.layers)]


def negate(slices):
    # Negation, not noise: it keeps the norm of a whole projection output, so a model that
    # normalises q or k across all heads (OLMo 2) still changes only the heads the slices feed.
    with torch.no_grad():
        for s in slices:
            s.param.index_copy_(s.dim, s.index, -s.select())


def changed_heads(model, layout, layer, slices, ids):
    """Heads of `layer` whose output-projection input changes when the entries of `slices` are
    negated (and restored afterwards); and whether any earlier layer changed."""
    before = head_inputs(model, layout, ids)
    negate(slices)
    try:
        after = head_inputs(model, layout, ids)
    finally:
        negate(slices)
    earlier = any(not torch.equal(before[i], after[i]) for i in range(layer))
    diff = (after[layer] - before[layer]).abs().amax(dim=(0, 1, 3))
    scale = before[layer].abs().amax(dim=(0, 1, 3))
    return {h for h in range(layout.n_heads) if diff[h] > 1e-6 * scale[h]}, earlier


def verify_layout(model, layout) -> None:
    """The layout's slices, checked through the weights against the model's forward pass."""
    ids = torch.arange(5, 12).repeat(2, 1) % model.get_input_embeddings().num_embeddings
    for li in sorted({0, layout.n_layers - 1}):
        lh = layout.layers[li]
        head = lh.n_heads - 1
        got, earlier = changed_heads(model, layout, li, lh.query_slices(head), ids)
        assert not earlier and got == {head}, f"layer {li}: q slices of head {head} change heads {sorted(got)}"
        group = lh.kv_group_of(head)
        got, earlier = changed_heads(model, layout, li, lh.kv_slices(group), ids)
        assert not earlier and got == set(lh.heads_of_group(group)), (
            f"layer {li}: k/v slices of group {group} change heads {sorted(got)}, not {lh.heads_of_group(group)}")
        # o columns: zeroing them equals zeroing the head's input block.
        x = torch.randn(3, lh.n_heads * lh.head_dim, generator=torch.Generator().manual_seed(li))
        (o,) = lh.output_slices(head)
        saved = o.select().clone()
        with torch.no_grad():
            xz = x.view(3, lh.n_heads, lh.head_dim).clone()
            xz[:, head] = 0
            expected = lh.o_proj(xz.view(3, -1))
            o.param.index_fill_(o.dim, o.index, 0.0)
            got_o = lh.o_proj(x)
            o.param.index_copy_(o.dim, o.index, saved)
        torch.testing.assert_close(got_o, expected, rtol=0, atol=1e-6)
        # Every entry of the sliced weights belongs to exactly one head (q, o) or KV group (k, v).
        counts, names = {}, {}
        slices = [s for h in range(lh.n_heads) for s in lh.query_slices(h) + lh.output_slices(h)]
        slices += [s for g in range(lh.n_kv_heads) for s in lh.kv_slices(g)]
        for s in slices:
            counts[id(s.param)] = counts.get(id(s.param), 0) + s.mask().int()
            names[id(s.param)] = s.name
        for key, c in counts.items():
            if c.unique().tolist() != [1]:
                raise AssertionError(f"{names[key]}: entries covered {c.unique().tolist()} times")


def check_restricted_training(model, layout, batch) -> None:
    """AdamW with weight decay under HeadRestriction moves every entry of the selected heads' slices
    (their KV groups included) and nothing else, bit for bit."""
    heads = [(0, layout.n_heads - 1), (layout.n_layers - 1, 0)]
    names = {id(p): n for n, p in model.named_parameters()}
    allowed = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    required = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for li, h in heads:
        lh = layout.layers[li]
        group = lh.kv_group_of(h)
        for s in lh.query_slices(h) + lh.output_slices(h) + lh.kv_slices(group):
            allowed[names[id(s.param)]] |= s.mask()
        # A key bias adds the same q·b to every logit of a query, which softmax ignores: its
        # gradient is zero, so it need not move.
        key_biases = {id(s.param) for s in lh.key_slices(group) if s.param.dim() == 1}
        for s in lh.query_slices(h) + lh.output_slices(h) + lh.kv_slices(group):
            if id(s.param) not in key_biases:
                required[names[id(s.param)]] |= s.mask()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    restriction = HeadRestriction(model, heads, kv="group").apply()
    assert restriction.count_trainable() == sum(int(m.sum()) for m in allowed.values())
    opt = torch.optim.AdamW(restriction.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    # Eval mode: dropout would zero some entries' gradients at random, depending on the RNG state.
    for _ in range(3):
        per_sample_loss(model(**inputs, use_cache=False).logits, batch["labels"]).mean().backward()
        opt.step()
        opt.zero_grad()
    restriction.merge()
    for n, p in model.named_parameters():
        outside = ~allowed[n]
        assert torch.equal(p[outside], before[n][outside]), f"{n} moved outside the selected heads' slices"
        inside = required[n]
        assert bool((p[inside] != before[n][inside]).all()), f"{n}: some entries of the selected slices did not train"


@dataclass
class Outcome:
    model_type: str
    status: str  # exact | n/a | xfail | FAIL
    detail: str = ""
    layout: str = ""
    ap_error: float | None = None
    seconds: float = 0.0


def describe(layout) -> str:
    """E.g. "4 heads / 2 KV, head_dim 16, q/k/v, o: self_attn.o_proj" (per-layer values joined by /)."""
    lh = layout.layers[0]
    o = lh.o_proj_name.split(".")[-2:]
    fused = {p.name for p in lh._q} & {p.name for p in lh._k + lh._v}
    qkv = "fused " + fused.pop().split(".")[-1] if fused else "q/k/v"
    kv = "/".join(str(n) for n in dict.fromkeys(lh.n_kv_heads for lh in layout.layers))
    hd = "/".join(str(n) for n in dict.fromkeys(lh.head_dim for lh in layout.layers))
    return f"{layout.n_heads} heads / {kv} KV, head_dim {hd}, {qkv}, o: {'.'.join(o)}"


def run_checks(model_type: str) -> Outcome:
    """Builds the tiny model and runs the three checks; raises on a failed check."""
    start = time.perf_counter()
    model = tiny_model(model_type)
    try:
        layout = find_heads(model)
    except HeadsNotFound as e:
        return Outcome(model_type, "n/a", f"{e.kind}: {e}", seconds=time.perf_counter() - start)
    verify_layout(model, layout)
    batch = batch_for(model)
    ref, _, how = reference_ap_of(model, batch, n_layers=layout.n_layers)
    plain = model_type in PLAIN_LOSS
    chunk = 0 if plain else DEFAULT_CHUNK_SIZE
    got = compute_ap(model, [batch], layout=layout, progress=False, loss_chunk_size=chunk).scores
    how += "; plain loss (`loss_chunk_size: 0`)" if plain else ""
    err = max_rel_err(got, ref)
    assert err <= AP_TOLERANCE, f"AP max relative error {err:.1e} > {AP_TOLERANCE:.0e} (reference via {how})"
    check_restricted_training(model, layout, batch)
    return Outcome(model_type, "exact", how, describe(layout), err, time.perf_counter() - start)


def check(model_type: str) -> Outcome:
    """The outcome of one model type, never raising: failures are Outcome(status="FAIL")."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: on models this small, a second one only adds synchronisation (several times slower).
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            out = run_checks(model_type)
        except Exception as e:  # noqa: BLE001 - the outcome records it
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")
            status = "xfail" if model_type in XFAIL else "FAIL"
            return Outcome(model_type, status, msg[:400], seconds=time.perf_counter() - start)
        finally:
            transformers.logging.set_verbosity(verbosity)
            torch.set_num_threads(threads)
    if model_type in XFAIL:
        if out.status == "exact":
            out.status, out.detail = "FAIL", f"XPASS: passes, but XFAIL lists it ({XFAIL[model_type]})"
        else:
            out.status = "xfail"  # e.g. find_heads could not run the model built from the tiny config
    return out


# ------------------------------------------------------------------------------------------------
# the README table

BEGIN = "<!-- architectures:begin (generated by scripts/architectures_table.py; do not edit by hand) -->"
END = "<!-- architectures:end -->"


def where(layout_text: str) -> str:
    """The structural part of `describe()` (projections, output projection), without the tiny
    model's head counts."""
    return layout_text.split(", ", 2)[-1] if layout_text else ""


def render_table(outcomes: dict[str, Outcome]) -> str:
    rows = [outcomes[mt] for mt in MODEL_TYPES]
    counts = {s: sum(o.status == s for o in rows) for s in ("exact", "n/a", "xfail", "FAIL")}
    lines = [
        BEGIN,
        f"{len(rows)} model types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` of transformers {transformers.__version__}: "
        f"**{counts['exact']} exact**, {counts['n/a']} not applicable, {counts['xfail']} expected failures"
        + (f", **{counts['FAIL']} failing**" if counts["FAIL"] else "") + ".",
        "",
        "| model type | outcome | projections / reason |",
        "|---|---|---|",
    ]
    for o in rows:
        if o.status == "exact":
            how = "" if o.detail == "interface" else "; reference Γ from eager `output_attentions`"
            note = where(o.layout) + how
        elif o.status == "n/a":
            note = NOT_APPLICABLE.get(o.model_type, ("", o.detail))[1]
        elif o.status == "xfail":
            note = XFAIL[o.model_type]
        else:
            note = o.detail
        lines.append(f"| `{o.model_type}` | {o.status} | {note.replace('|', '/')} |")
    lines.append(END)
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN):text.index(END) + len(END)]


def with_block(text: str, block: str) -> str:
    old = readme_block(text)
    if old is None:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} block to fill")
    return text.replace(old, block)
