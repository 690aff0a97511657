"""SFTModule in a plain Lightning Trainer (no lit_heads callbacks): training mode, gradient
checkpointing, and the one definition of the validation / test loss."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_heads.data import SFTDataModule
from lit_heads.module import SFTModule
from tiny_models import reference_losses

DATA = dict(train_size=8, val_size=5, max_length=128, batch_size=2)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, bundled_tokenizer):
    """A 2-layer GPT-2 with heavy dropout (0.5 on embeddings, attention and residuals)."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = bundled_tokenizer
    model = tiny_model("gpt2", attn_implementation="sdpa", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n_positions=256,
                       embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class TrainStepProbe(L.Callback):
    """Records, at each training step: the model's mode, whether two forward passes of the batch
    differ (dropout), and how often the first decoder layer's MLP ran during the step (2 with gradient
    checkpointing: the forward and its recomputation in the backward)."""

    def __init__(self, layer_of):
        self.layer_of, self.steps, self._calls = layer_of, [], 0

    def on_train_start(self, trainer, pl_module):
        def count(*_):
            self._calls += 1

        # A pre-hook: the recomputation stops early once it has what the backward needs, which
        # can be before a forward (post-)hook would run.
        self.layer_of(pl_module.model).register_forward_pre_hook(count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            a, b = (pl_module(batch["input_ids"], batch["attention_mask"]) for _ in range(2))
        self.steps.append({"training": pl_module.model.training, "forwards_differ": not torch.equal(a, b),
                           "checkpointing": pl_module.model.is_gradient_checkpointing})
        self._calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["layer_calls"] = self._calls


def test_the_model_trains_in_train_mode_with_dropout_active(tiny_gpt2_dir):
    module = SFTModule(str(tiny_gpt2_dir), num_generate=0)
    assert not module.model.training  # from_pretrained returns eval mode
    probe = TrainStepProbe(lambda model: model.transformer.h[0].mlp)
    trainer(max_steps=2, callbacks=[probe]).fit(module, SFTDataModule(tokenizer=str(tiny_gpt2_dir), **DATA))
    assert [s["training"] for s in probe.steps] == [True, True]
    assert all(s["forwards_differ"] for s in probe.steps)  # dropout is on
    assert [s["layer_calls"] for s in probe.steps] == [1, 1]


def test_gradient_checkpointing_engages_in_training(tiny_llama_dir):
    module = SFTModule(str(tiny_llama_dir), num_generate=0, gradient_checkpointing=True)
    probe = TrainStepProbe(lambda model: model.model.layers[0].mlp)
    trainer(max_steps=2, callbacks=[probe]).fit(module, SFTDataModule(tokenizer=str(tiny_llama_dir), **DATA))
    assert [(s["training"], s["checkpointing"]) for s in probe.steps] == [(True, True), (True, True)]
    # The layer's forward runs again in the backward: its activations were not kept.
    assert [s["layer_calls"] for s in probe.steps] == [2, 2]


def test_validation_and_test_loss_are_token_weighted_over_the_whole_set_and_exp_is_ppl(tiny_llama_dir):
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), **DATA)  # 5 validation samples in batches of 2, 2, 1
    module = SFTModule(str(tiny_llama_dir), num_generate=0)
    validated = trainer(limit_val_batches=None).validate(module, dm)[0]
    tested = trainer().test(module, dm)[0]

    dm.setup("fit")
    lengths = [int((b["labels"] != -100).sum()) for b in dm.val_dataloader()]
    assert len(set(lengths)) > 1, lengths  # uneven response tokens per batch
    expected, batch_weighted = reference_losses(tiny_llama_dir, dm.val_dataloader())
    assert abs(expected - batch_weighted) > 1e-3  # the two definitions differ here; the test can tell them apart
    assert validated["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert validated["val/ppl"] == pytest.approx(math.exp(validated["val/loss"]), rel=1e-6)
    # No test set: test runs on the validation data, and logs under test/*.
    assert set(tested) == {"test/loss", "test/ppl"}
    assert tested["test/loss"] == pytest.approx(expected, rel=1e-5)
    assert tested["test/ppl"] == pytest.approx(math.exp(tested["test/loss"]), rel=1e-6)

    # FitSummary's measurement (and anything else reporting a validation loss) is the same number.
    assert module.evaluate_loss(dm.val_dataloader()) == pytest.approx(expected, rel=1e-5)
