"""Training completes and the metrics are on disk (`<save_dir>/metrics.jsonl`) whatever W&B does:
no API key, no network, WANDB_MODE=disabled, a W&B run that cannot even be created (online without
a key, a rejected key, an unwritable W&B folder), and a W&B error in the middle of the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_heads.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Every test here is a whole fit (3 steps) through the CLI: slow.
pytestmark = pytest.mark.slow
TINY = {
    "data": {"val_size": 2},
    "trainer": {
        "max_steps": 3,
        "log_every_n_steps": 1,
        "val_check_interval": 3,
        "enable_progress_bar": False,
        "default_root_dir": "wb",
        "logger": {"class_path": "lit_heads.loggers.WandbLogger", "init_args": {"name": "t", "offline": None}},
        "callbacks": [{"class_path": "lit_heads.callbacks.fit_summary.FitSummary"}],
    },
}


def no_network(*args, **kwargs):
    raise OSError("network is unreachable (test)")


@pytest.fixture
def fit(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("lit_heads.loggers.socket.create_connection", no_network)  # fast, and never the real network
    tiny_overlay(TINY)
    import wandb

    wandb.teardown()  # wandb keeps the settings (mode, key) of its first run in a process-wide singleton

    def run():
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml", "--model.model",
              str(tiny_llama_dir)])
        rows = [json.loads(line) for line in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in rows if "train/loss" in r}) == [0, 1, 2]  # every step's loss, on disk
        assert any("val/loss" in r for r in rows)
        summary = json.loads((tmp_path / "wb" / "fit_summary.json").read_text())
        assert summary["steps"] == 3  # training completed
        assert torch.load(summary["checkpoint"], weights_only=False)["global_step"] == 3  # a checkpoint was saved
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


def test_wandb_disabled(fit, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = fit()
    assert summary["wandb_run"] is None
    assert not list(tmp_path.rglob("offline-run-*"))  # disabled means no W&B run, not an offline one


def test_online_without_a_key_falls_back_to_offline(fit, monkeypatch, recwarn):
    """WANDB_MODE=online forces the online attempt, which wandb.init refuses without a key."""
    monkeypatch.setenv("WANDB_MODE", "online")
    summary = fit()
    err = warned(recwarn)
    assert err.count("W&B could not start the run (UsageError: No API key configured") == 1
    assert "W&B runs offline; upload later with `wandb sync" in err
    assert Path(summary["wandb_run"]).name.startswith("offline-run-")


def test_a_rejected_key_falls_back_to_offline(fit, monkeypatch, recwarn):
    """An invalid key makes wandb.init fail after its timeout (100 s); here it fails at once, as it
    would then, for every attempt that is not offline."""
    import wandb

    real_init = wandb.init
    attempts = []

    def init(*args, **kwargs):
        attempts.append(kwargs.get("mode"))
        if kwargs.get("mode") in ("offline", "disabled"):
            return real_init(*args, **kwargs)
        raise wandb.errors.CommError("Run initialization has timed out after 90.0 sec. (invalid API key)")

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    reachable = type("Connection", (), {"close": lambda self: None})
    monkeypatch.setattr("lit_heads.loggers.socket.create_connection", lambda *a, **k: reachable())
    summary = fit()
    assert attempts == ["online", "offline"]  # online first (key and server "fine"), then offline
    assert warned(recwarn).count("W&B could not start the run (CommError: Run initialization has timed out") == 1
    assert Path(summary["wandb_run"]).name.startswith("offline-run-")


def test_an_unwritable_wandb_folder_turns_wandb_off(fit, tmp_path, recwarn):
    (tmp_path / "wb").mkdir()
    (tmp_path / "wb" / "wandb").write_text("a file where W&B needs its folder")
    summary = fit()
    err = warned(recwarn)
    assert err.count("W&B could not start the run (NotADirectoryError") == 1 and "W&B is off for this run" in err
    assert summary["wandb_run"] is None


def test_wandb_that_cannot_start_at_all(fit, monkeypatch, recwarn):
    import wandb

    def init(*args, **kwargs):
        raise RuntimeError(f"wandb is broken (test, mode {kwargs.get('mode')})")

    monkeypatch.setattr(wandb, "init", init)
    summary = fit()
    message = "W&B could not start the run, not even switched off (RuntimeError: wandb is broken"
    assert warned(recwarn).count(message) == 1
    assert summary["wandb_run"] is None


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


def test_offline_run_after_a_disabled_one_in_the_same_process(tmp_path, monkeypatch):
    # W&B's process-wide settings keep the WANDB_MODE of the first run of a process; a later
    # offline logger must still write an offline run, not a no-op one (seen after `lit_heads ablate`
    # ran with WANDB_MODE=disabled in the same test session).
    from lit_heads.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = WandbLogger(save_dir=str(tmp_path / "a"))
    first.experiment
    first.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    second = WandbLogger(save_dir=str(tmp_path / "b"))
    try:
        run_dir = Path(second.experiment.dir).parent
        assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "b" / "wandb"
    finally:
        second.finish()
