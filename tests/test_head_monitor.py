"""HeadActivationMonitor inside a real fit on a tiny Llama: schedule, numbers, files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import monitored_overrides
from lit_heads.callbacks.head_monitor import HeadActivationMonitor
from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError
from lit_heads.heads.history import PatternHistory
from lit_heads.heads.scoring import compute_ap

ROOT = Path(__file__).resolve().parents[1]
TINY = monitored_overrides(
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"dirpath": "runs/quickstart/checkpoints", "save_last": True, "save_top_k": -1,
                   "every_n_train_steps": 2}})


@pytest.fixture
def fit_args(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_overlay(TINY)
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml", "--model.model",
            str(tiny_llama_dir)]


def probe_batches(model_dir):
    dm = SFTDataModule(tokenizer=str(model_dir), train_size=16, val_size=8, max_length=128, batch_size=3)
    dm.setup("fit")
    return list(dm.make_dataloader(dm.val_examples[:6]))


@pytest.mark.slow
def test_monitor_records_schedule_and_exact_patterns(fit_args, tmp_path, tiny_llama_dir):
    main(fit_args)
    heads_dir = tmp_path / "runs" / "quickstart" / "heads"
    history = PatternHistory.load(heads_dir / "ap_history.safetensors")
    assert history.steps == [0, 2, 4]
    assert (heads_dir / "ap_statistics.png").stat().st_size > 0 and (heads_dir / "ap_step000004.png").exists()

    # The recorded patterns are the AP of the model at that step, recomputed independently here
    # (other batching, fresh model objects): step 0 from the base model, step 4 from the export.
    batches = probe_batches(tiny_llama_dir)
    base = compute_ap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), batches, progress=False).scores
    final = compute_ap(AutoModelForCausalLM.from_pretrained(tmp_path / "runs/quickstart/export"), batches,
                       progress=False).scores
    torch.testing.assert_close(history.scores[0], base, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(history.scores[-1], final, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(history.scores[0], history.scores[-1], rtol=1e-3)  # training moved it

    metrics = [json.loads(line) for line in (tmp_path / "runs/quickstart/metrics.jsonl").read_text().splitlines()]
    probe_steps = [m["step"] for m in metrics if "heads/gini" in m]
    assert probe_steps == [0, 2, 4]
    last = next(m for m in metrics if m["step"] == 4 and "heads/corr_vs_start" in m)
    assert last["heads/mse_vs_start"] > 0 and -1 <= last["heads/corr_vs_start"] < 1
    assert 0 <= last["heads/topk_overlap_prev"] <= 1
    assert any("heads_free/gini" in m for m in metrics)  # the free pattern from the training backward


@pytest.mark.slow
def test_resume_continues_the_history(fit_args, tmp_path):
    main([*fit_args, "--trainer.max_steps", "2"])
    first = PatternHistory.load(tmp_path / "runs/quickstart/heads/ap_history.safetensors")
    assert first.steps == [0, 2]
    main([*fit_args, "--ckpt_path", "runs/quickstart/checkpoints/last.ckpt"])
    resumed = PatternHistory.load(tmp_path / "runs/quickstart/heads/ap_history.safetensors")
    assert resumed.steps == [0, 2, 4]
    for a, b in zip(first.scores, resumed.scores[:2]):
        assert torch.equal(a, b)  # restored from the checkpoint, not recomputed


@pytest.mark.parametrize("kwargs, message",
                         [({"probe_size": 0}, "probe_size"), ({"every_n_steps": 0}, "every_n_steps")])
def test_bad_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HeadActivationMonitor(**kwargs)
