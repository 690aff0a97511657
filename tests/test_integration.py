"""The quickstart recipe through the real CLI on the real bundled SmolLM2-135M, shortened to a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_heads.data import SFTDataModule
from lit_heads.heads.history import PatternHistory
from lit_heads.models import load_model
from lit_heads.module import response_loss

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
# train_size == batch_size: every step sees the same batch, so its loss must go down.
SHORT = [
    "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
    "--data.train_size", "4", "--data.batch_size", "4", "--data.val_size", "4",
    "--model.num_generate", "2", "--model.max_new_tokens", "8",
]


def test_quickstart_fit_on_the_bundled_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_heads.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *SHORT],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lit_heads fit summary" in result.stdout + result.stderr
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "fit_summary.json").read_text())

    dm = SFTDataModule(tokenizer="smollm2-135m", train_size=4, batch_size=4, val_size=4, max_length=160)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    base = load_model("smollm2-135m")
    exported = AutoModelForCausalLM.from_pretrained(run / "export")
    with torch.no_grad():
        before = response_loss(base(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        after = response_loss(exported(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        assert after < before * 0.9, (float(before), float(after))
        # The checkpoint and the export hold the same trained weights.
        from_ckpt = load_model(summary["checkpoint"])
        ids = batch["input_ids"][:1]
        torch.testing.assert_close(from_ckpt(ids).logits, exported(ids).logits, rtol=0, atol=1e-5)

    wandb_run = Path(summary["wandb_run"])
    blob = next(wandb_run.glob("*.wandb")).read_bytes()
    for key in (b"train/loss", b"val/loss", b"val/acc", b"heads/gini"):
        assert key in blob
    assert (wandb_run / "files" / "lit_heads_config.yaml").is_file()
    history = PatternHistory.load(run / "heads" / "ap_history.safetensors")
    assert history.steps == [0, 4] and history.scores[0].shape == (30, 9)


def test_ap_command_on_real_gsm8k_matches_the_paper_reference(tmp_path):
    """`lit_heads ap` on the bundled model and 3 GSM8K questions equals the paper's literal procedure
    (scripts/reference_ap.py: eager attention, retained Γ, Σ Γ·∂L/∂Γ, batch 1), shorter padding."""
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not gsm8k.is_file():
        pytest.skip(f"{gsm8k} not found")
    result = subprocess.run(
        [sys.executable, "-m", "lit_heads.cli", "ap", "--model", "smollm2-135m", "--data", str(gsm8k),
         "--n_samples", "3", "--batch_size", "3", "--output", "out/ap"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    from lit_heads.heads.pattern import Pattern

    pattern = Pattern.load(tmp_path / "out" / "ap" / "pattern.safetensors")
    assert pattern.shape == (30, 9) and pattern.meta["n_samples"] == 3

    sys.path.insert(0, str(ROOT / "scripts"))
    from reference_ap import load_reference_model, reference_ap

    from lit_heads.data import SFTDataModule, load_source
    from lit_heads.data.collate import pad_token_id

    dm = SFTDataModule(tokenizer="smollm2-135m", max_length=512)
    samples, truncated = dm.encoder.encode_all(load_source(str(gsm8k), size=3, seed=0)[:3], "gsm8k")
    assert truncated == 0
    pad_to = max(len(s["input_ids"]) for s in samples) + 8  # padded, as the release does, but not to 1,024
    expected = reference_ap(load_reference_model("smollm2-135m"), samples, pad_token_id(dm.tokenizer), pad_to=pad_to)
    rel = ((pattern.scores.double() - expected.double()).abs() / expected.double().abs()).max()
    assert rel <= 1e-4, float(rel)
