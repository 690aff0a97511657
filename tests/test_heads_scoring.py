"""AP scoring against an independent eager reference that differentiates the attention matrix Γ.

The reference (tests/ap_reference.py) registers its own attention function (explicit softmax, Γ kept)
and its own causal+padding mask function with transformers, so it shares neither the kernel nor the
mask code with the models under test (models outside the attention interface give Γ through eager
`output_attentions`); it backpropagates each sample's loss separately and computes Eq. 2 literally:
AP[l, h] = mean_b |Σ_{q,k} Γ ∂L_b/∂Γ|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ap_reference import REF, max_rel_err, reference_ap_of
from lit_heads.errors import DataError
from lit_heads.heads import HeadGateCapture, compute_ap, find_heads, per_sample_scale
from lit_heads.heads.pattern import FORMULA_VERSION
from tiny_models import sft_batch, tiny_model


def reference_ap(arch, batch, **model_kw):
    """Returns (AP [L, H] as float64, per-sample signed scores [B, L, H])."""
    model = tiny_model(arch, **model_kw)
    ap, per_sample, _ = reference_ap_of(model, batch, n_layers=model.config.num_hidden_layers)
    return ap, per_sample


def test_reference_is_the_same_model_and_causal():
    batch = sft_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ref = tiny_model("llama", attn_implementation=REF)(**inputs).logits
    eager = tiny_model("llama", attn_implementation="eager")(**inputs).logits
    torch.testing.assert_close(ref, eager, rtol=1e-5, atol=1e-5)
    # Causality: changing the last real token of sample 0 leaves earlier logits unchanged.
    ids = batch["input_ids"].clone()
    ids[0, 11] = (ids[0, 11] + 1) % 90 + 1
    ref2 = tiny_model("llama", attn_implementation=REF)(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(ref2[0, :11], ref[0, :11], rtol=0, atol=0)


ACCURACY: dict[str, float] = {}


AP_ARCHS = ["llama", "gpt2", "qwen2", "qwen3", "gpt_neox", "opt", "phi3", "gemma2", "gemma3_text", "falcon",
            "falcon_gqa", "gpt_bigcode", "codegen"]


# transformers has no SDPA path for these (Gemma 2: with attention-logit softcapping).
NO_SDPA = {"bloom", "gemma2"}


@pytest.mark.parametrize("arch", AP_ARCHS + ["bloom"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compute_ap_matches_gamma_reference(arch, attn):
    if arch in NO_SDPA and attn == "sdpa":
        pytest.skip(f"{arch}: transformers has no SDPA implementation for this config")
    batch = sft_batch(lengths=(12, 9, 5, 7), prompt_lengths=(4, 3, 1, 6), seed=2)
    ref, _ = reference_ap(arch, batch)
    model = tiny_model(arch, attn_implementation=attn)
    pattern = compute_ap(model, [batch], progress=False)
    assert pattern.shape == (2, model.config.num_attention_heads)
    assert torch.all(ref > 0)
    err = max_rel_err(pattern.scores, ref)
    ACCURACY[f"{arch}/{attn}"] = err
    print(f"max rel err {arch}/{attn}: {err:.2e}")
    assert err <= 1e-4, err
    assert pattern.meta["n_samples"] == 4 and pattern.meta["formula_version"] == FORMULA_VERSION
    assert pattern.meta["arch"] == model.config.model_type


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_left_padding_without_position_ids_matches_right_padding(arch):
    """GPT-2's absolute positions made a left-padded batch without position_ids score 0.40 off;
    compute_ap now numbers each sample's real tokens from 0 whatever the padding side."""
    kw = dict(lengths=(10, 6, 8), prompt_lengths=(3, 2, 5), seed=4)
    right, left = sft_batch(**kw), sft_batch(**kw, padding_side="left")
    assert "position_ids" not in left
    ref, _ = reference_ap(arch, right)
    model = tiny_model(arch, attn_implementation="sdpa")
    assert max_rel_err(compute_ap(model, [left], progress=False).scores, ref) <= 1e-4
    # And each sample alone, unpadded, gives the same pattern on average.
    alone = [compute_ap(model, [{k: v[b:b + 1, -n:] for k, v in left.items()}], progress=False).scores
             for b, n in enumerate(kw["lengths"])]
    assert max_rel_err(torch.stack(alone).mean(0), ref) <= 1e-4


def test_capture_refuses_left_padding_where_positions_are_absolute():
    batch = sft_batch(lengths=(10, 6, 8), prompt_lengths=(3, 2, 5), seed=4, padding_side="left")
    gpt2 = tiny_model("gpt2")
    with HeadGateCapture(gpt2), pytest.raises(DataError, match="left-padded batch without position_ids.*GPT2"):
        gpt2(**batch)
    # With position ids, or on a model that derives them from the mask (OPT), it scores as usual.
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    for model, extra in ((gpt2, {"position_ids": positions}), (tiny_model("opt"), {})):
        with HeadGateCapture(model) as cap:
            model(**batch, **extra).loss.backward()
            signed = cap.pop(scale=per_sample_scale(batch["labels"]))
        expected = compute_ap(model, [batch], progress=False).scores
        assert max_rel_err(signed.abs().mean(0), expected) <= 1e-4


def test_left_padding_refused_where_the_model_takes_no_position_ids():
    # BART's decoder used as a causal LM has learned absolute positions and no position_ids input.
    import arch_sweep

    model = arch_sweep.tiny_model("bart")
    left = sft_batch(lengths=(10, 6), prompt_lengths=(3, 2), seed=4, padding_side="left")
    with pytest.raises(DataError, match="AP batch 0 is left-padded.*takes no position_ids.*Pad the batch on the right"):
        compute_ap(model, [left], progress=False)
    compute_ap(model, [sft_batch(lengths=(10, 6), prompt_lengths=(3, 2), seed=4)], progress=False)  # right: fine


def test_left_padding_with_position_ids_matches_reference():
    batch = sft_batch(lengths=(10, 6, 8), prompt_lengths=(3, 2, 5), seed=4, padding_side="left")
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    ref, _ = reference_ap("llama", batch)
    for attn in ("eager", "sdpa"):
        got = compute_ap(tiny_model("llama", attn_implementation=attn), [batch], progress=False).scores
        assert max_rel_err(got, ref) <= 1e-4


def test_sdpa_and_eager_agree():
    batches = [sft_batch(seed=s) for s in range(2)]
    a = compute_ap(tiny_model("qwen2", attn_implementation="eager"), batches, progress=False).scores
    b = compute_ap(tiny_model("qwen2", attn_implementation="sdpa"), batches, progress=False).scores
    assert max_rel_err(a, b) <= 1e-5


def test_padding_adds_nothing_and_samples_are_independent():
    """AP of a padded batch = mean of each sample scored alone, unpadded."""
    model = tiny_model("llama", attn_implementation="sdpa")
    batch = sft_batch(lengths=(12, 9, 5), prompt_lengths=(4, 3, 1), seed=5)
    together = compute_ap(model, [batch], progress=False).scores
    alone = []
    for b, n in enumerate((12, 9, 5)):
        single = {k: v[b : b + 1, :n] for k, v in batch.items()}
        alone.append(compute_ap(model, [single], progress=False).scores)
    assert max_rel_err(together, torch.stack(alone).mean(0)) <= 1e-5
    # More padding on the same batch changes nothing either.
    padded = {
        k: F.pad(v, (0, 6), value={"input_ids": 0, "attention_mask": 0, "labels": -100}[k]) for k, v in batch.items()
    }
    assert max_rel_err(compute_ap(model, [padded], progress=False).scores, together) <= 1e-5


def test_multiple_batches_average_over_samples():
    model = tiny_model("gpt2")
    b1 = sft_batch(lengths=(8, 6), prompt_lengths=(2, 2), seed=6)
    b2 = sft_batch(lengths=(9, 5, 7), prompt_lengths=(3, 1, 2), seed=7)
    p1 = compute_ap(model, [b1], progress=False).scores
    p2 = compute_ap(model, [b2], progress=False).scores
    both = compute_ap(model, [b1, b2], progress=False)
    assert both.meta["n_samples"] == 5
    assert max_rel_err(both.scores, (2 * p1 + 3 * p2) / 5) <= 1e-5


def test_state_is_left_exactly_as_found():
    model = tiny_model("llama", attention_dropout=0.3)
    layout = find_heads(model)
    model.train()
    model.model.layers[1].eval()  # a mixed train/eval state must come back per module
    # Partially frozen, with accumulated gradients on some parameters and none on others.
    for name, p in model.named_parameters():
        if "layers.0" in name or "embed" in name:
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "layers.1.mlp" in name or "o_proj" in name:
            p.grad = torch.randn(p.shape, generator=g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    batch = sft_batch()
    got = compute_ap(model, [batch], layout=layout, progress=False).scores

    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.requires_grad == flags[n], n
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    # Scored in eval mode (dropout off) and with frozen parameters: equals the reference.
    ref, _ = reference_ap("llama", batch)
    assert max_rel_err(got, ref) <= 1e-4


def test_callable_under_inference_mode_and_no_grad():
    model = tiny_model("qwen2")
    batch = sft_batch()
    plain = compute_ap(model, [batch], progress=False).scores
    with torch.inference_mode():
        inf_batch = {k: v.clone() for k, v in batch.items()}
        under_inf = compute_ap(model, [inf_batch], progress=False).scores
    with torch.no_grad():
        under_ng = compute_ap(model, [batch], progress=False).scores
    assert torch.equal(plain, under_inf) and torch.equal(plain, under_ng)


def test_free_capture_from_training_backward_equals_compute_ap():
    """A training step's own backward (HF token-mean loss, fp16-style loss scale, gradient
    accumulation) gives the same AP as compute_ap once rescaled with per_sample_scale."""
    model = tiny_model("llama")
    batch = sft_batch(lengths=(12, 9, 5, 7), prompt_lengths=(4, 3, 1, 6), seed=8)
    expected = compute_ap(model, [batch], progress=False).scores
    loss_scale, accumulate = 1024.0, 4
    with HeadGateCapture(model) as cap:
        out = model(**batch)  # HF loss: mean over all response tokens of the batch
        (out.loss * loss_scale / accumulate).backward()
        signed = cap.pop(scale=per_sample_scale(batch["labels"], loss_scale=loss_scale,
                                                accumulate_grad_batches=accumulate))
    assert signed.shape == (4, 2, 4)
    assert max_rel_err(signed.abs().mean(0), expected) <= 1e-4
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None  # it was a real backward
    # Hooks are gone after the context: no record is made by later passes.
    model(**batch).loss.backward()
    assert cap.pop() is None


def test_free_capture_two_forwards_one_backward_and_sample_mean():
    model = tiny_model("gpt2")
    b1 = sft_batch(lengths=(8, 6), prompt_lengths=(2, 2), seed=9)
    b2 = sft_batch(lengths=(9, 5, 7), prompt_lengths=(3, 1, 2), seed=10)
    _, ref1 = reference_ap("gpt2", b1)
    _, ref2 = reference_ap("gpt2", b2)
    from lit_heads.heads.scoring import per_sample_loss

    with HeadGateCapture(model) as cap:
        l1 = per_sample_loss(model(**{k: b1[k] for k in ("input_ids", "attention_mask")}).logits, b1["labels"]).mean()
        l2 = per_sample_loss(model(**{k: b2[k] for k in ("input_ids", "attention_mask")}).logits, b2["labels"]).mean()
        (l1 + l2).backward()
        signed = cap.pop()
    # sample_mean over each micro-batch: gradient of sample b is ∂L_b / B_i.
    signed = signed * torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0])[:, None, None]
    assert max_rel_err(signed, torch.cat([ref1, ref2])) <= 1e-4  # signed, per sample, in forward order
    assert torch.equal(per_sample_scale(b1["labels"], reduction="sample_mean"), torch.tensor([2.0, 2.0]))


def test_capture_with_all_parameters_frozen():
    model = tiny_model("qwen2")
    model.requires_grad_(False)
    batch = sft_batch()
    with HeadGateCapture(model) as cap:
        from lit_heads.heads.scoring import per_sample_loss

        per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["labels"]).sum().backward()
        signed = cap.pop()
    _, ref = reference_ap("qwen2", batch)
    assert max_rel_err(signed, ref) <= 1e-4


def test_sample_without_response_tokens_is_a_data_error():
    batch = sft_batch(lengths=(8, 6), prompt_lengths=(2, 6))
    with pytest.raises(DataError, match=r"sample\(s\) \[1\].*no response tokens"):
        compute_ap(tiny_model("llama"), [batch], progress=False)


def test_labels_on_padding_and_missing_keys_are_data_errors():
    batch = sft_batch(lengths=(8, 6), prompt_lengths=(2, 2))
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][1, 7] = 5
    with pytest.raises(DataError, match="padding"):
        compute_ap(tiny_model("llama"), [bad], progress=False)
    with pytest.raises(DataError, match="labels"):
        compute_ap(tiny_model("llama"), [{"input_ids": batch["input_ids"]}], progress=False)
    with pytest.raises(DataError, match="no samples"):
        compute_ap(tiny_model("llama"), [], progress=False)


def test_progress_bar_is_shown(capsys):
    compute_ap(tiny_model("llama"), [sft_batch(), sft_batch(seed=1)], progress=True)
    assert "activation pattern" in capsys.readouterr().err


# -- torch.distributed -------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama", attn_implementation="sdpa")
        batches = _ddp_batches()[rank::world]
        pattern = compute_ap(model, batches, progress=False)
        torch.save({"scores": pattern.scores, "n": pattern.meta["n_samples"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_batches():
    # Unequal halves (3 samples vs 2) so a mean-of-means bug would show.
    return [
        sft_batch(lengths=(8, 6), prompt_lengths=(2, 2), seed=11),
        sft_batch(lengths=(5, 9), prompt_lengths=(1, 4), seed=12),
        sft_batch(lengths=(7,), prompt_lengths=(3,), seed=13),
    ]


@pytest.mark.slow
def test_distributed_all_reduce_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    single = compute_ap(tiny_model("llama", attn_implementation="sdpa"), _ddp_batches(), progress=False)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == 5
        assert max_rel_err(got["scores"], single.scores) <= 1e-6


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_free_capture_with_gradient_checkpointing(reentrant):
    model = tiny_model("llama")
    batch = sft_batch(seed=14)
    expected = compute_ap(model, [batch], progress=False).scores
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # HF only checkpoints in training mode; dropout is 0 in the tiny config
    with HeadGateCapture(model) as cap:
        model(**batch).loss.backward()
        signed = cap.pop(scale=per_sample_scale(batch["labels"]))
    # Recomputation must neither drop nor double-count a layer.
    assert max_rel_err(signed.abs().mean(0), expected) <= 1e-4


def test_bfloat16_model_is_scored_close_to_float32():
    batch = sft_batch(lengths=(12, 9, 5, 7), prompt_lengths=(4, 3, 1, 6), seed=15)
    f32 = compute_ap(tiny_model("llama"), [batch], progress=False).scores
    bf16 = compute_ap(tiny_model("llama", dtype=torch.bfloat16), [batch], progress=False).scores
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    # bf16 has ~3 significant digits; the pattern must still be the same pattern.
    assert max_rel_err(bf16, f32) < 0.1


def test_per_sample_loss_keeps_fp32_precision_on_a_large_vocabulary():
    # SmolLM2's vocabulary size: a per-sample loss that drifts by 1e-6 relative moves small AP
    # scores visibly, so the loss must stay within rounding of an fp64 computation.
    torch.manual_seed(0)
    batch, length, vocab = 4, 100, 49152
    logits = torch.randn(batch, length, vocab) * 3
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :30] = -100
    from lit_heads.heads.scoring import per_sample_loss

    got = per_sample_loss(logits, labels).double()
    targets = labels[:, 1:]
    token_ce = F.cross_entropy(
        logits[:, :-1].double().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="none")
    expected = token_ce.view(targets.shape).sum(1) / (targets != -100).sum(1)
    assert ((got - expected).abs() / expected).max() < 5e-7
