"""The chunked response-token loss (lit_heads.heads.lm_loss) against the plain full-logits path.

Tiny random float32 models on CPU: the loss, every parameter's gradient (embeddings included) and
the activation pattern equal the plain path's; the [batch, seq, vocab] logits never exist, neither
saved for backward nor as a working tensor of forward or backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lit_heads.errors import ConfigError
from lit_heads.heads import lm_loss
from lit_heads.heads.lm_loss import HeadNotReproducible, logits_token_losses, mean_loss, sample_means, token_losses
from lit_heads.heads.scoring import compute_ap, per_sample_loss
from tiny_models import sft_batch, tiny_model

LENGTHS, PROMPTS = (12, 9, 5), (4, 3, 1)  # 8 + 6 + 4 = 18 labelled tokens


def _models():
    return {
        "llama-untied": tiny_model("llama", tie_word_embeddings=False),
        "llama-tied": tiny_model("llama", tie_word_embeddings=True),
        # Gemma 3's final-logit softcapping, small enough to change a tiny model's logits a lot.
        "gemma3-softcap": tiny_model("gemma3_text", final_logit_softcapping=0.1, head_dim=16, query_pre_attn_scalar=16),
    }


MODELS = list(_models())


@pytest.fixture(scope="module")
def models():
    return _models()


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _loss_and_grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    loss = mean_loss(token_losses(model, _inputs(batch), batch["labels"], chunk_size=chunk_size))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_equal_the_plain_path(models, name, padding_side):
    model = models[name]
    batch = sft_batch(LENGTHS, PROMPTS, padding_side=padding_side)
    plain_loss, plain_grads = _loss_and_grads(model, batch, 0)
    assert torch.isfinite(plain_loss)
    for chunk_size in (1, 5, 7, 1024):  # 18 labelled tokens: 5 and 7 leave a partial last chunk
        loss, grads = _loss_and_grads(model, batch, chunk_size)
        assert _rel(loss, plain_loss) <= 1e-5, (chunk_size, float(loss), float(plain_loss))
        assert grads.keys() == plain_grads.keys()
        for n, g in grads.items():
            assert plain_grads[n].abs().max() > 0, n  # every parameter, embeddings included, gets a gradient
            assert _rel(g, plain_grads[n]) <= 1e-5, (chunk_size, n, _rel(g, plain_grads[n]))


def test_the_model_variants_are_what_they_claim(models):
    tied, untied = models["llama-tied"], models["llama-untied"]
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    gemma = models["gemma3-softcap"]
    assert gemma.get_output_embeddings().weight is gemma.get_input_embeddings().weight
    batch = sft_batch(LENGTHS, PROMPTS)
    token_losses(gemma, _inputs(batch), batch["labels"])
    assert lm_loss._CHECKED[gemma].softcap == 0.1
    # The softcap matters here: without it the same model's logits are far off.
    with torch.no_grad():
        uncapped = gemma.lm_head(gemma.model(**_inputs(batch))[0])
        capped = gemma(**_inputs(batch)).logits
    assert _rel(uncapped, capped) > 0.1


def test_per_token_and_per_sample_losses_equal_the_plain_path(models):
    model = models["gemma3-softcap"]
    batch = sft_batch(LENGTHS, PROMPTS)
    with torch.no_grad():
        logits = model(**_inputs(batch)).logits
        chunked = token_losses(model, _inputs(batch), batch["labels"], chunk_size=5)
    plain = logits_token_losses(logits, batch["labels"])
    assert chunked.shape == plain.shape == (18,) and chunked.dtype == torch.float32
    assert _rel(chunked, plain) <= 1e-6
    assert _rel(sample_means(chunked, batch["labels"]), per_sample_loss(logits, batch["labels"])) <= 1e-6


def test_a_batch_without_labelled_tokens_gives_what_the_plain_path_gives(models):
    model = models["llama-untied"]
    batch = sft_batch(LENGTHS, PROMPTS)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    plain_loss, plain_grads = _loss_and_grads(model, batch, 0)
    loss, grads = _loss_and_grads(model, batch, 4)
    assert torch.isnan(plain_loss) and torch.isnan(loss)  # cross-entropy's mean over no token
    for n, g in grads.items():
        assert torch.equal(g, plain_grads[n]) and not g.any(), n  # zero gradients, not missing ones


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", ["llama-untied", "gemma3-softcap"])
def test_activation_pattern_is_unchanged(models, name, padding_side):
    model = models[name]
    batches = [sft_batch(LENGTHS, PROMPTS, seed=s, padding_side=padding_side) for s in range(2)]
    plain = compute_ap(model, batches, progress=False, loss_chunk_size=0).scores
    chunked = compute_ap(model, batches, progress=False, loss_chunk_size=5).scores
    assert plain.abs().min() > 0
    assert _rel(chunked, plain) <= 1e-6


# ------------------------------------------------------------------------------------------------
# memory

V = 1024


class _WidestLogits(TorchDispatchMode):
    """The most positions of any freshly allocated tensor whose last dimension is the vocabulary,
    over every op of forward and backward (views of existing tensors allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given
            if fresh and t.dim() and t.shape[-1] == V:
                self.rows = max(self.rows, t.numel() // V)
        return out


@pytest.mark.parametrize("chunk_size", [0, 37, 100])  # 100: all 90 labelled positions in one chunk
def test_memory_is_bounded_by_the_chunk(chunk_size):
    # Hidden 32 < chunk 37: the head's weight ([V, 32]) is not mistaken for a chunk of logits.
    model = tiny_model("llama", vocab_size=V)
    batch = sft_batch((40, 33, 25), (4, 3, 1), vocab=V)  # 36 + 30 + 24 = 90 labelled of 120 positions
    B, T = batch["input_ids"].shape
    token_losses(model, _inputs(batch), batch["labels"], chunk_size=chunk_size)  # the one-off head check
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel())
        return t

    widest = _WidestLogits()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), widest:
        loss = mean_loss(token_losses(model, _inputs(batch), batch["labels"], chunk_size=chunk_size))
    with widest:
        loss.backward()
    if chunk_size:
        assert max(saved) < chunk_size * V < B * T * V  # nothing vocabulary-sized is kept for backward
        assert 0 < widest.rows <= chunk_size  # nor ever exists beyond one chunk, forward or backward
    else:  # the plain path does hold them: the checks above can fail
        assert max(saved) >= B * (T - 1) * V
        assert widest.rows >= B * (T - 1)


def test_the_head_is_recomputed_only_when_there_are_several_chunks():
    model = tiny_model("llama", vocab_size=V)
    batch = sft_batch((40, 33, 25), (4, 3, 1), vocab=V)  # 90 labelled positions
    token_losses(model, _inputs(batch), batch["labels"], chunk_size=37)  # the one-off head check
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        for chunk_size, expected in ((37, [37, 37, 16] * 2), (90, [90]), (100, [90])):
            calls.clear()
            mean_loss(token_losses(model, _inputs(batch), batch["labels"], chunk_size=chunk_size)).backward()
            assert sorted(calls) == sorted(expected), (chunk_size, calls)
    finally:
        hook.remove()


# ------------------------------------------------------------------------------------------------
# refusals


def test_a_logit_transform_the_chunked_path_does_not_know_is_refused():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 2.0  # read by the chunked path, ignored by Llama's forward
    batch = sft_batch(LENGTHS, PROMPTS)
    for _ in range(2):  # the verdict is kept: the second call refuses too, without a new check
        with pytest.raises(HeadNotReproducible, match=r"LlamaForCausalLM: its forward does something between the "
                           r"decoder's hidden states and the logits .*Tried: lm_head, softcap 2: logits off by .*"
                           r"loss_chunk_size: 0"):
            token_losses(model, _inputs(batch), batch["labels"])
    # The plain path still works for it.
    assert torch.isfinite(mean_loss(token_losses(model, _inputs(batch), batch["labels"], chunk_size=0)))


def test_a_model_without_separate_head_is_refused():
    from transformers import LlamaModel

    model = LlamaModel(tiny_model("llama").config)
    batch = sft_batch(LENGTHS, PROMPTS)
    with pytest.raises(HeadNotReproducible, match=r"LlamaModel has no decoder .*model.loss_chunk_size: 0"):
        token_losses(model, _inputs(batch), batch["labels"])


def test_a_negative_chunk_size_is_refused():
    batch = sft_batch(LENGTHS, PROMPTS)
    with pytest.raises(ConfigError, match="loss_chunk_size must be a positive number of positions"):
        token_losses(tiny_model("llama"), _inputs(batch), batch["labels"], chunk_size=-1)


# ------------------------------------------------------------------------------------------------
# SFTModule: the knob, training with gradient checkpointing, validation


def _module_step(module, batch):
    """Loss, every gradient and the row counts the LM head saw, for one training step's loss."""
    seen = []
    handle = module.model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    module.model.zero_grad(set_to_none=True)
    loss = module.loss(batch)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    return loss.detach(), grads, seen


def test_module_knob_and_gradient_checkpointing(tiny_llama_dir):
    from lit_heads.data import SFTDataModule
    from lit_heads.module import SFTModule

    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), train_size=4, val_size=4, max_length=128, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n_labelled = int((batch["labels"][:, 1:] != -100).sum())
    plain = SFTModule(str(tiny_llama_dir), num_generate=0, loss_chunk_size=0)
    chunked = SFTModule(str(tiny_llama_dir), num_generate=0, loss_chunk_size=16, gradient_checkpointing=True)
    plain.train(), chunked.train()  # training mode: the model's own checkpointing recomputes the layers
    assert chunked.model.is_gradient_checkpointing and chunked.model.model.gradient_checkpointing
    plain_loss, plain_grads, plain_seen = _module_step(plain, batch)
    loss, grads, seen = _module_step(chunked, batch)
    assert _rel(loss, plain_loss) <= 1e-5
    for n, g in grads.items():
        assert _rel(g, plain_grads[n]) <= 1e-5, n
    # The plain path runs the head on every position at once, the chunked one on 16 labelled ones at a time
    # (forward, then again in backward).
    assert plain_seen == [torch.Size([*batch["input_ids"].shape, 64])]
    rows = [s[0] for s in seen if len(s) == 2]  # not the one-off check's [1, 8, hidden] probe
    assert max(rows) == 16 and sum(rows) == 2 * n_labelled
    # Validation's one definition of the loss, on either path.
    plain.eval(), chunked.eval()
    expected = plain.evaluate_loss(dm.val_dataloader())
    assert chunked.evaluate_loss(dm.val_dataloader()) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# every causal-LM model type of the installed transformers (slow, like the architecture sweep)



@pytest.mark.slow
@pytest.mark.parametrize("model_type", __import__("arch_sweep").MODEL_TYPES)
def test_every_model_type_gives_the_plain_losses_or_is_refused(model_type):
    import arch_sweep

    try:
        model = arch_sweep.tiny_model(model_type)
        batch = arch_sweep.batch_for(model)
        with torch.no_grad():
            plain = token_losses(model, _inputs(batch), batch["labels"], chunk_size=0)
    except Exception as err:  # the sweep documents these (XFAIL): no tiny model of the type runs offline
        pytest.skip(f"no tiny {model_type} runs: {type(err).__name__}: {str(err)[:200]}")
    if model_type in arch_sweep.PLAIN_LOSS:
        with pytest.raises(HeadNotReproducible, match="loss_chunk_size: 0"):
            token_losses(model, _inputs(batch), batch["labels"], chunk_size=5)
        return
    with torch.no_grad():
        chunked = token_losses(model, _inputs(batch), batch["labels"], chunk_size=5)
    assert _rel(chunked, plain) <= 1e-5
