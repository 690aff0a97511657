"""Training completes and the metrics are on disk (`<save_dir>/metrics.jsonl`) whatever W&B does:
no API key, no network, WANDB_MODE=disabled, and a W&B error in the middle of the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_heads.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = """
model: {num_generate: 0}
data: {train_size: 8, val_size: 2, max_length: 96, batch_size: 2}
trainer:
  max_steps: 3
  log_every_n_steps: 1
  val_check_interval: 3
  enable_progress_bar: false
  default_root_dir: wb
  logger:
    class_path: lit_heads.loggers.WandbLogger
    init_args: {name: t, offline: null}
  callbacks:
    - class_path: lit_heads.callbacks.fit_summary.FitSummary
"""


def no_network(*args, **kwargs):
    raise OSError("network is unreachable (test)")


@pytest.fixture
def fit(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("lit_heads.loggers.socket.create_connection", no_network)  # fast, and never the real network
    (tmp_path / "tiny.yaml").write_text(TINY)

    def run():
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml", "--model.model", str(tiny_llama_dir)])
        rows = [json.loads(line) for line in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in rows if "train/loss" in r}) == [0, 1, 2]  # every step's loss, on disk
        assert any("val/loss" in r for r in rows)
        summary = json.loads((tmp_path / "wb" / "fit_summary.json").read_text())
        assert summary["steps"] == 3  # training completed
        return summary

    return run


def warned(recwarn) -> str:
    # rank_zero_warn goes through the warnings module, which pytest records.
    return "\n".join(str(w.message) for w in recwarn)


def test_no_api_key_goes_offline(fit, recwarn):
    summary = fit()
    assert "no W&B API key" in warned(recwarn)
    assert Path(summary["wandb_run"]).name.startswith("offline-run-")  # `wandb sync` can upload it later


def test_no_network_with_a_key_goes_offline(fit, monkeypatch, recwarn):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    summary = fit()
    assert "api.wandb.ai is not reachable" in warned(recwarn)
    assert Path(summary["wandb_run"]).name.startswith("offline-run-")


def test_wandb_disabled(fit, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    fit()


def test_wandb_error_during_the_run(fit, monkeypatch, recwarn):
    import wandb.sdk.wandb_run as wandb_run

    calls = {"n": 0}
    real_log = wandb_run.Run.log

    def failing_log(self, *args, **kwargs):  # W&B works for the first call, then breaks mid-run
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("W&B backend went away (test)")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "log", failing_log)
    fit()
    err = warned(recwarn)
    assert calls["n"] >= 2  # the failure really happened during training
    assert err.count("W&B logging failed (RuntimeError: W&B backend went away (test))") == 1  # reported once
