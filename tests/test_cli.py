"""The `lit_heads` CLI end to end on a tiny random Llama: configs, overrides, DDP, precision, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_heads.cli import main
from lit_heads.models import load_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY = """
model:
  num_generate: 4
  max_new_tokens: 6
data:
  train_size: 8
  val_size: 4
  max_length: 128
trainer:
  max_steps: 3
  val_check_interval: 2
  log_every_n_steps: 1
"""


@pytest.fixture
def tiny_cfg(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstart writes to ./runs/quickstart
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    return ["--config", str(QUICKSTART), "--config", str(cfg), "--model.model", str(tiny_llama_dir)]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_heads.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fit_writes_summary_checkpoint_and_reloadable_export(tiny_cfg, tmp_path):
    main(["fit", *tiny_cfg])
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["before"]) >= {"val_loss", "val_acc"} and set(summary["after"]) >= {"val_loss", "val_acc"}
    assert summary["after"]["val_loss"] != summary["before"]["val_loss"]

    ids = torch.tensor([[1, 400, 401, 402, 2]])
    exported = AutoModelForCausalLM.from_pretrained(summary["export"])
    from_ckpt = load_model(summary["checkpoint"])
    torch.testing.assert_close(exported(ids).logits, from_ckpt(ids).logits, rtol=0, atol=1e-5)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    assert {"train/loss", "val/loss", "val/ppl", "val/acc", "lr", "train/tokens_per_s"} <= keys

    wandb_run = Path(summary["wandb_run"])
    assert wandb_run.name.startswith("offline-run-")
    blob = next(wandb_run.glob("*.wandb")).read_bytes()
    assert b"val/loss" in blob and b"train/tokens_per_s" in blob  # keys are stored verbatim in the records
    assert "optimizer" in (wandb_run / "files" / "lit_heads_config.yaml").read_text()

    # A second run in the same folder must not trip over the existing config.yaml.
    main(["fit", *tiny_cfg, "--trainer.max_steps", "1"])
    assert json.loads((run / "fit_summary.json").read_text())["steps"] == 1


def test_print_config_shows_every_section(tiny_cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_cfg, "--trainer.max_steps", "7", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "class_path: torch.optim.AdamW" in out
    assert "class_path: lit_heads.loggers.WandbLogger" in out
    # model.model is linked to data.tokenizer, so one name configures both.
    assert "tokenizer" not in out.split("data:")[1].split("trainer:")[0]


def test_validate_and_test_subcommands(tiny_cfg, capsys):
    main(["validate", *tiny_cfg])
    main(["test", *tiny_cfg])
    out = capsys.readouterr().out
    assert "val/loss" in out and "val/acc" in out


@pytest.mark.parametrize("flags", [["--trainer.devices", "2", "--trainer.strategy", "ddp"], ["--trainer.precision", "bf16-mixed"]], ids=["ddp-cpu-2", "bf16-mixed"])
def test_trainer_flags_for_devices_and_precision(tiny_cfg, tmp_path, flags):
    result = run_cli("fit", *tiny_cfg, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "fit_summary.json").read_text())
    assert summary["steps"] == 3 and summary["after"]["val_loss"] < 50


def test_unknown_model_is_a_clear_error_with_exit_2(tmp_path):
    result = run_cli("fit", "--config", str(QUICKSTART), "--model.model", "no-such-model", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown model 'no-such-model'" in result.stderr and "Tried:" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_a_clear_error_with_exit_2(tiny_cfg, tmp_path):
    result = run_cli("fit", *tiny_cfg, "--data.train", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
