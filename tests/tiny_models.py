"""Tiny random-initialised causal LMs and SFT batches for unit tests (seconds on 2 CPU cores).

`tiny_model("llama")` builds a 2-layer model with GQA where the architecture has it; `ARCHS` lists
every architecture available. `sft_batch(...)` builds a padded batch following the project's batch
contract (input_ids, attention_mask, labels with -100 on prompt and padding).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 97

# Shared sizes: hidden 32, 4 query heads, 2 KV heads (GQA) where the architecture supports it.
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(
    _IDS, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)

_CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(_COMMON, num_key_value_heads=2, head_dim=8)),
    "mistral": (transformers.MistralConfig, dict(_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=None)),
    "mixtral": (
        transformers.MixtralConfig,
        dict(_COMMON, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1),
    ),
    "qwen2": (transformers.Qwen2Config, dict(_COMMON, num_key_value_heads=2, use_sliding_window=False)),
    # head_dim 16 != hidden / heads = 8: catches code that derives head_dim from hidden size.
    "qwen3": (transformers.Qwen3Config, dict(_COMMON, num_key_value_heads=2, head_dim=16, use_sliding_window=False)),
    "gemma": (transformers.GemmaConfig, dict(_COMMON, num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=64, query_pre_attn_scalar=16),
    ),
    "phi3": (transformers.Phi3Config, dict(_COMMON, num_key_value_heads=2)),
    "gpt2": (
        transformers.GPT2Config,
        dict(_IDS, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64),
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        dict(_COMMON, max_position_embeddings=64, attention_bias=True, use_parallel_residual=True),
    ),
    "opt": (
        transformers.OPTConfig,
        dict(
            _IDS,
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
    ),
}

# Fused and multi-query layouts whose slices discovery must get exactly right, and the Gemma
# generations lit_heads bundles or users try first.
_CONFIGS.update({
    # Falcon MQA (the original layout): fused rows [q of every head | one k | one v].
    "falcon": (
        transformers.FalconConfig,
        dict(_COMMON, multi_query=True, new_decoder_architecture=False, alibi=False, bias=True, parallel_attn=True),
    ),
    # Falcon's new decoder architecture, GQA: rows per KV group [its q heads | k | v].
    "falcon_gqa": (
        transformers.FalconConfig,
        dict(_COMMON, new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=True),
    ),
    # BLOOM: rows per head [q | k | v] (like GPT-NeoX), ALiBi positions.
    "bloom": (transformers.BloomConfig, dict(_IDS, vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    # GPT-BigCode MQA: Conv1D-free Linear c_attn with rows [q of every head | one k | one v].
    "gpt_bigcode": (
        transformers.GPTBigCodeConfig,
        dict(_IDS, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, multi_query=True),
    ),
    # CodeGen: qkv_proj rows in 4 blocks (mp_num), each [q | v | k] of a quarter of the heads.
    "codegen": (
        transformers.CodeGenConfig,
        dict(_IDS, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_positions=64, n_inner=64, rotary_dim=4),
    ),
    # Gemma 3: sliding-window and full layers, head_dim 256 (as in Gemma 3 270M), 1 KV head.
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        dict(_COMMON, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"]),
    ),
})
# Gemma 2 with attention-logit softcapping small enough to matter on a tiny model.
_CONFIGS["gemma2"][1].update(attn_logit_softcapping=0.5, final_logit_softcapping=3.0, sliding_window=4)

ARCHS = sorted(_CONFIGS)


def tiny_config(arch: str, **overrides):
    cls, kwargs = _CONFIGS[arch]
    return cls(**{**kwargs, **overrides})


def tiny_model(arch: str = "llama", *, attn_implementation: str = "eager", seed: int = 0, dtype=torch.float32,
               **overrides):
    """A random-initialised *ForCausalLM for `arch`, in eval mode, with non-trivial biases.

    Biases are randomised because HF initialises them to zero, which would hide slice bugs in bias
    rows (a wrong bias row of zeros is still zeros).
    """
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
    model.eval()
    return model


def sft_batch(
    lengths=(12, 9, 5),
    prompt_lengths=(4, 3, 1),
    *,
    vocab: int = VOCAB,
    seed: int = 0,
    pad_id: int = 0,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """A padded SFT batch: `labels` is -100 on the first `prompt_lengths[b]` tokens and on padding."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    B = len(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids = torch.randint(1, vocab, (n,), generator=g)
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = ids
        attention_mask[b, sl] = 1
        lab = ids.clone()
        lab[:p] = -100
        labels[b, sl] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def reference_losses(model_dir, loader) -> tuple[float, float]:
    """A validation loss computed independently of lit_heads, for tests to hold the logged one to:
    (token-weighted: float64 sum of every response token's cross-entropy / their number, the mean of
    per-batch means). The two differ when batches hold different numbers of response tokens."""
    import torch.nn.functional as F

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            targets = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
            mask = targets != -100
            total += float(losses[mask].sum())
            count += int(mask.sum())
            batch_means.append(float(losses[mask].mean()))
    return total / count, sum(batch_means) / len(batch_means)
