"""The `lit_heads` CLI end to end on a tiny random Llama: configs, overrides, DDP, precision, export."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.models import load_model
from tiny_models import reference_losses

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# Over conftest's tiny overlay; batch_size 4 is the quickstart's own.
TINY = {
    "model": {"num_generate": 4, "max_new_tokens": 6},
    "data": {"max_length": 128, "batch_size": 4},
    "trainer": {"max_steps": 3, "val_check_interval": 2, "log_every_n_steps": 1},
}


@pytest.fixture
def tiny_cfg(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstart writes to ./runs/quickstart
    cfg = tiny_overlay(TINY)
    return ["--config", str(QUICKSTART), "--config", str(cfg), "--model.model", str(tiny_llama_dir)]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_heads.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_data(model_dir, **overrides) -> SFTDataModule:
    """The data of the quickstart + TINY configs, built here to recompute logged numbers independently."""
    return SFTDataModule(tokenizer=str(model_dir), train="generated:arithmetic,code,string,math_code",
                         **{**dict(train_size=8, val_size=4, max_length=128, batch_size=4, seed=42), **overrides})


@pytest.mark.slow
def test_fit_writes_summary_checkpoint_and_reloadable_export(tiny_cfg, tmp_path, tiny_llama_dir):
    main(["fit", *tiny_cfg])
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["before"]) >= {"val_loss", "val_acc"} and set(summary["after"]) >= {"val_loss", "val_acc"}
    assert summary["after"]["val_loss"] != summary["before"]["val_loss"]
    # "before" is the base model's validation loss, as val/loss defines it.
    before = reference_losses(tiny_llama_dir, tiny_data(tiny_llama_dir).val_dataloader())[0]
    assert summary["before"]["val_loss"] == pytest.approx(before, rel=1e-5)

    ids = torch.tensor([[1, 400, 401, 402, 2]])
    exported = AutoModelForCausalLM.from_pretrained(summary["export"])
    from_ckpt = load_model(summary["checkpoint"])
    torch.testing.assert_close(exported(ids).logits, from_ckpt(ids).logits, rtol=0, atol=1e-5)

    metrics = read_metrics(run)
    keys = set().union(*metrics)
    assert {"train/loss", "val/loss", "val/ppl", "val/acc", "lr-AdamW", "train/device/items_per_sec"} <= keys
    # LearningRateMonitor: the learning rate of each step, here in the warmup (lr 3e-4, 5 warmup steps).
    assert [(m["step"], m["lr-AdamW"]) for m in metrics if "lr-AdamW" in m] == pytest.approx(
        [(k, 3e-4 * (k + 1) / 6) for k in range(3)])
    # TokenThroughput counts real tokens: after 3 steps of batch 4 on 8 samples, both batches of
    # epoch 0 and the first batch of epoch 1.
    dm = tiny_data(tiny_llama_dir)
    loader = dm.train_dataloader()
    epoch0 = sum(int(b["attention_mask"].sum()) for b in loader)
    loader.sampler.set_epoch(1)
    tokens = epoch0 + int(next(iter(loader))["attention_mask"].sum())
    last = [m for m in metrics if "train/lengths" in m][-1]
    assert (last["train/samples"], last["train/lengths"]) == (12, tokens)
    assert all(m["train/device/items_per_sec"] > 0 for m in metrics if "train/device/items_per_sec" in m)

    wandb_run = Path(summary["wandb_run"])
    assert wandb_run.name.startswith("offline-run-")
    blob = next(wandb_run.glob("*.wandb")).read_bytes()
    assert b"val/loss" in blob and b"train/device/items_per_sec" in blob  # keys are stored verbatim in the records
    assert "optimizer" in (wandb_run / "files" / "lit_heads_config.yaml").read_text()

    # A second run in the same folder must not trip over the existing config.yaml.
    main(["fit", *tiny_cfg, "--trainer.max_steps", "1"])
    assert json.loads((run / "fit_summary.json").read_text())["steps"] == 1


def files_under(folder: Path) -> dict[str, bytes]:
    # Not symlinks: W&B links each run's logs/debug-core.log to its service's one log in ~/.cache/wandb.
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
def test_default_root_dir_alone_moves_every_output_and_leaves_the_previous_run_alone(tiny_cfg, tmp_path):
    main(["fit", *tiny_cfg, "--trainer.max_steps", "1"])
    previous = tmp_path / "runs" / "quickstart"
    kept = files_under(previous)
    assert {"metrics.jsonl", "config.yaml", "fit_summary.json", "checkpoints/last.ckpt", "export/model.safetensors",
            "heads/ap_history.safetensors"} <= set(kept)

    main(["fit", *tiny_cfg, "--trainer.max_steps", "1", "--trainer.default_root_dir", "runs/moved"])
    moved = tmp_path / "runs" / "moved"
    summary = json.loads((moved / "fit_summary.json").read_text())
    assert Path(summary["log_dir"]) == moved and Path(summary["checkpoint"]) == moved / "checkpoints" / "last.ckpt"
    assert Path(summary["export"]) == moved / "export" and Path(summary["wandb_run"]).parent == moved / "wandb"
    written = files_under(moved)
    for name in ("metrics.jsonl", "config.yaml", "checkpoints/last.ckpt", "export/model.safetensors",
                 "heads/ap_history.safetensors", "heads/ap_step000001.png"):
        assert name in written, name
    assert "default_root_dir: runs/moved" in written["config.yaml"].decode()
    assert files_under(previous) == kept  # nothing of the new run went to, or changed, the previous folder
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["moved", "quickstart"]


def test_print_config_shows_every_section(tiny_cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_cfg, "--trainer.max_steps", "7", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "class_path: torch.optim.AdamW" in out
    assert "class_path: lit_heads.loggers.WandbLogger" in out
    # model.model is linked to data.tokenizer, so one name configures both.
    assert "tokenizer" not in out.split("data:")[1].split("trainer:")[0]


@pytest.mark.slow
def test_validate_and_test_log_their_own_keys_with_the_token_weighted_loss(tiny_cfg, tmp_path, tiny_llama_dir, capsys):
    # 5 validation samples in batches of 2, 2 and 1: the response tokens per batch are uneven.
    data = ["--data.val_size", "5", "--data.batch_size", "2"]
    main(["validate", *tiny_cfg, *data, "--trainer.default_root_dir", "runs/validate"])
    main(["test", *tiny_cfg, *data, "--trainer.default_root_dir", "runs/test"])
    assert "test/loss" in capsys.readouterr().out  # Lightning's results table

    expected = reference_losses(tiny_llama_dir, tiny_data(tiny_llama_dir, val_size=5, batch_size=2).val_dataloader())[0]
    logged = {}
    for stage, folder in (("val", "validate"), ("test", "test")):
        rows = [m for m in read_metrics(tmp_path / "runs" / folder) if any(k.startswith(f"{stage}/") for k in m)]
        values = {k: v for m in rows for k, v in m.items()
                  if k.split("/")[0] in ("val", "test") and k.split("/")[1] in ("loss", "ppl", "acc")}
        assert set(values) == {f"{stage}/loss", f"{stage}/ppl", f"{stage}/acc"}, values  # test is not logged as val/*
        assert values[f"{stage}/loss"] == pytest.approx(expected, rel=1e-5)
        assert values[f"{stage}/ppl"] == pytest.approx(math.exp(values[f"{stage}/loss"]), rel=1e-5)
        assert 0 <= values[f"{stage}/acc"] <= 1
        logged[stage] = values
    # No test set: test runs on the validation data, with the same answers.
    assert logged["test"]["test/acc"] == logged["val"]["val/acc"]


@pytest.mark.slow
def test_ddp_validation_loss_counts_every_sample_once_over_both_ranks(tiny_cfg, tmp_path, tiny_llama_dir):
    """5 samples on 2 ranks: Lightning's default sampler would repeat one to make 3 + 3."""
    result = run_cli("validate", *tiny_cfg, "--data.val_size", "5", "--data.batch_size", "2", "--model.num_generate",
                     "0",
                     "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    values = {k: v for m in read_metrics(tmp_path / "runs" / "quickstart") for k, v in m.items() if k in ("val/loss",
                                                                                                          "val/ppl")}
    expected = reference_losses(tiny_llama_dir, tiny_data(tiny_llama_dir, val_size=5, batch_size=2).val_dataloader())[0]
    assert values["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert values["val/ppl"] == pytest.approx(math.exp(values["val/loss"]), rel=1e-5)


@pytest.mark.slow
def test_resumed_fit_summary_reports_the_run_start_as_before(tiny_cfg, tmp_path):
    main(["fit", *tiny_cfg, "--trainer.max_steps", "2"])
    run = tmp_path / "runs" / "quickstart"
    first = json.loads((run / "fit_summary.json").read_text())
    main(["fit", *tiny_cfg, "--trainer.max_steps", "4", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    resumed = json.loads((run / "fit_summary.json").read_text())
    assert resumed["steps"] == 4
    assert resumed["before"] == first["before"]  # the base model, not the step-2 weights it resumed from
    assert resumed["after"]["val_loss"] != first["after"]["val_loss"]


@pytest.mark.slow
def test_sharegpt_data_without_answers_trains_and_reports_accuracy_as_not_applicable(tiny_cfg, tmp_path, caplog):
    records = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Say {w}."},
                                  {"from": "gpt", "value": f"{w}!"}]} for w in ("hi", "yes", "no", "ok", "bye", "go")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.INFO):
        main(["fit", *tiny_cfg, "--data.train", "chat.jsonl", "--data.val_split", "0.34", "--trainer.max_steps", "2"])
    assert "val accuracy    n/a (no gradable answers)" in caplog.text and "0 prompts" not in caplog.text
    run = tmp_path / "runs" / "quickstart"
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["after"]["val_acc"] is None and summary["after"]["val_acc_n"] == 0
    assert summary["steps"] == 2 and math.isfinite(summary["after"]["val_loss"])
    metrics = read_metrics(run)
    assert any("val/loss" in m for m in metrics) and not any("val/acc" in m for m in metrics)


# ddp: 5 validation samples in batches of 2 give the ranks 2 and 1 validation batches, each sample once.
@pytest.mark.slow
@pytest.mark.parametrize("flags",
                         [["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.val_size", "5",
                           "--data.batch_size", "2"],
                                   ["--trainer.precision", "bf16-mixed"]], ids=["ddp-cpu-2", "bf16-mixed"])
def test_trainer_flags_for_devices_and_precision(tiny_cfg, tmp_path, flags):
    result = run_cli("fit", *tiny_cfg, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "fit_summary.json").read_text())
    assert summary["steps"] == 3 and summary["after"]["val_loss"] < 50


@pytest.mark.slow
def test_unknown_model_is_a_clear_error_with_exit_2(tmp_path):
    result = run_cli("fit", "--config", str(QUICKSTART), "--model.model", "no-such-model", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown model 'no-such-model'" in result.stderr and "Tried:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_data_file_is_a_clear_error_with_exit_2(tiny_cfg, tmp_path):
    result = run_cli("fit", *tiny_cfg, "--data.train", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.jsonl" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
