"""Exact resume after SIGKILL, and checkpoint / pattern files that a kill cannot corrupt.

The fits run as `python -m lit_heads.cli`-style subprocesses (a SIGKILL must kill a real process),
on the tiny random Llama, one thread, deterministic settings. An uninterrupted run is the reference;
a second run is SIGKILLed mid-epoch (in its second epoch, so the epoch-dependent shuffle matters
too) and resumed with `--ckpt_path last`; the final weights must be bit-identical (`torch.equal`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

KILL_AT = 8  # 12 train samples / batch 2 = 6 batches per epoch: step 8 is batch 2 of epoch 1
MAX_STEPS = 10


class KillAtStep(L.Callback):
    """Test-only: SIGKILL this process at the start of optimizer step `step` (no cleanup runs,
    as with an OOM kill or a pre-empted node)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


# Runs lit_heads.cli.main in a fresh interpreter that can import KillAtStep from this file.
BOOT = "import sys\nfrom lit_heads.cli import main\nmain(sys.argv[1:])\n"


def config(model_dir: Path, run: Path, *, restricted: bool, kill_at: int | None, version: int) -> str:
    callbacks = f"""
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run}/checkpoints, every_n_train_steps: 1, save_last: true, save_top_k: -1}}
    - class_path: lit_heads.callbacks.head_monitor.HeadActivationMonitor
      init_args: {{every_n_steps: 3, probe: val, probe_size: 4, free: true, top_k: 3, log_table: false, dirpath: {run}/heads}}
    - class_path: lit_heads.callbacks.export.ExportHF
      init_args: {{dirpath: {run}/export}}"""
    if restricted:
        callbacks += f"""
    - class_path: lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning
      init_args: {{strategy: top, top_k: 3, n_score_samples: 4, dirpath: {run}/heads}}"""
    if kill_at is not None:
        callbacks += f"""
    - class_path: test_resume.KillAtStep
      init_args: {{step: {kill_at}}}"""
    return textwrap.dedent(f"""
    seed_everything: 7
    model:
      model: {model_dir}
      num_generate: 0
      optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 3.0e-3, weight_decay: 0.01}}}}
      scheduler: {{class_path: lit_heads.optim.WarmupCosine, init_args: {{warmup_steps: 2}}}}
    data: {{train: "generated:arithmetic,code", train_size: 12, val_size: 4, max_length: 96, batch_size: 2, seed: 3}}
    trainer:
      accelerator: cpu
      devices: 1
      max_steps: {MAX_STEPS}
      deterministic: true
      num_sanity_val_steps: 0
      limit_val_batches: 0
      enable_progress_bar: false
      enable_model_summary: false
      default_root_dir: {run}
      logger:
        class_path: lightning.pytorch.loggers.CSVLogger
        init_args: {{save_dir: {run}, name: logs, version: {version}}}
      callbacks:""") + callbacks + "\n"


def fit(tmp: Path, name: str, model_dir: Path, run: Path, *, restricted: bool, kill_at=None, version=0,
        extra=()) -> subprocess.CompletedProcess:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config(model_dir, run, restricted=restricted, kill_at=kill_at, version=version))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BOOT, "fit", "--config", str(cfg), *extra],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == MAX_STEPS
    return state["state_dict"]


def monitor_rows(run: Path, version: int, first_step: int) -> list[dict]:
    import csv

    with open(run / "logs" / f"version_{version}" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("heads/gini") and int(r["step"]) >= first_step]
    return [{k: v for k, v in r.items() if k.startswith("heads/") and v} | {"step": r["step"]} for r in rows]


def assert_same_run(ref: Path, resumed: Path) -> None:
    a, b = final_weights(ref), final_weights(resumed)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"resumed weights differ from the uninterrupted run in {len(differing)} tensors, e.g. {differing[:3]}"
    # The exported (merged) model too: the weights a user takes away.
    from safetensors.torch import load_file

    ea, eb = load_file(ref / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)

    from lit_heads.heads.history import PatternHistory

    ha, hb = PatternHistory.load(ref / "heads" / "ap_history.safetensors"), PatternHistory.load(resumed / "heads" / "ap_history.safetensors")
    assert ha.steps == hb.steps == [0, 3, 6, 9, 10]
    assert all(torch.equal(x, y) for x, y in zip(ha.scores, hb.scores))
    # The monitor's logged statistics after the resume point match the reference's, value for value.
    assert monitor_rows(resumed, 1, KILL_AT) == monitor_rows(ref, 0, KILL_AT)
    # Every checkpoint left by the killed and resumed process is a complete, loadable file.
    for ckpt in (resumed / "checkpoints").glob("*.ckpt"):
        torch.load(ckpt, map_location="cpu", weights_only=False)
    assert (resumed / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, tiny_llama_dir):
    """Uninterrupted runs (full SFT and head-restricted) built once."""
    tmp = tmp_path_factory.mktemp("resume-ref")
    class Lazy(dict):  # build a reference only when a test asks for it
        def __missing__(self, restricted):
            self[restricted] = build(restricted)
            return self[restricted]

    def build(restricted):
        run = tmp / f"ref-{restricted}"
        result = fit(tmp, f"ref-{restricted}", tiny_llama_dir, run, restricted=restricted)
        assert result.returncode == 0, result.stderr[-3000:]
        return run

    return Lazy()


def kill_and_resume(tmp: Path, model_dir: Path, *, restricted: bool) -> Path:
    run = tmp / "run"
    killed = fit(tmp, "killed", model_dir, run, restricted=restricted, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == KILL_AT  # the kill came mid-epoch, after step KILL_AT's checkpoint
    resumed = fit(tmp, "resumed", model_dir, run, restricted=restricted, version=1,
                  extra=["--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run


# Head-restricted SFT with the AP monitor covers all three promises in one run (weights, monitor
# history, selection). Full SFT runs the same machinery (loader state, optimizer, scheduler) and
# passes too ("full-sft"); it is left out of the default run to keep the suite within its time budget:
# add False to the list to run it.
@pytest.mark.parametrize("restricted", [True], ids=["head-restricted"])
def test_sigkill_mid_epoch_then_resume_last_is_bit_exact(tmp_path, tiny_llama_dir, reference_runs, restricted):
    """Guarantee 1: weights, AP-monitor history/statistics and head selection of a killed+resumed run
    equal an uninterrupted run's (SFTDataModule's loader is resumable mid-epoch)."""
    run = kill_and_resume(tmp_path, tiny_llama_dir, restricted=restricted)
    assert_same_run(reference_runs[restricted], run)
    if restricted:
        sel_ref = json.loads((reference_runs[True] / "heads" / "selection.json").read_text())
        sel_new = json.loads((run / "heads" / "selection.json").read_text())
        assert sel_new["heads"] == sel_ref["heads"] and len(sel_new["heads"]) == 3
        assert sel_new["ranking_scores"] == sel_ref["ranking_scores"]


def test_datamodule_train_loader_is_resumable(tiny_llama_dir):
    from lightning.fabric.utilities.types import _Stateful

    from lit_heads.data import SFTDataModule

    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), train="generated:arithmetic", train_size=8, val_size=2, max_length=96)
    loader = dm.train_dataloader()
    assert isinstance(loader, _Stateful)
    sampler = loader.sampler
    sampler.set_epoch(1)
    first = [b["input_ids"].tolist() for b in loader]
    sampler.set_epoch(1)
    assert [b["input_ids"].tolist() for b in loader] == first  # the order is a function of the epoch


# ---- the resumable loader on its own -----------------------------------------------------------------


def test_resumable_loader_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    from lit_heads.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler

    data = list(range(11))

    def epoch_order(epoch):  # a fresh sampler each time: no state may carry over between passes
        sampler = ResumableRandomSampler(data, seed=5)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in ResumableDataLoader(data, batch_size=3, sampler=sampler)]

    orders = [epoch_order(e) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert sorted(sum(orders[1], [])) == data  # a permutation: every sample once per epoch
    sampler = ResumableRandomSampler(data, seed=5)
    loader = ResumableDataLoader(data, batch_size=3, sampler=sampler)
    for epoch in (2, 0, 1):  # the same loader, any epoch, any order of passes
        sampler.set_epoch(epoch)
        assert [b.tolist() for b in loader] == orders[epoch]

    sampler.set_epoch(1)
    it = iter(loader)
    seen = [next(it).tolist(), next(it).tolist()]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    fresh_sampler = ResumableRandomSampler(data, seed=5)
    fresh = ResumableDataLoader(data, batch_size=3, sampler=fresh_sampler)
    fresh.load_state_dict(state)
    fresh_sampler.set_epoch(1)
    assert seen + [b.tolist() for b in fresh] == orders[1]  # the rest of epoch 1, nothing repeated
    fresh_sampler.set_epoch(2)
    assert [b.tolist() for b in fresh] == orders[2]  # the skip applied once only

    # A state saved at the end of an epoch must not skip batches of the next epoch.
    done = ResumableDataLoader(data, batch_size=3, sampler=ResumableRandomSampler(data, seed=5))
    done.load_state_dict({"epoch": 1, "batches": 4})
    done.sampler.set_epoch(2)
    assert [b.tolist() for b in done] == orders[2]


# ---- atomic files ------------------------------------------------------------------------------------

KILL_MID_WRITE = r"""
import os, signal, sys, torch
from lit_heads.checkpoint_io import AtomicCheckpointIO
from lit_heads.heads.pattern import Pattern, atomic_write

target, kind = sys.argv[1], sys.argv[2]
if kind == "ckpt":
    io = AtomicCheckpointIO()
    def dying_write(checkpoint, f):
        f.write(b"PK\x03\x04 half of a zip archive")  # part of the new file reaches the disk...
        f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)          # ...then the process dies
    io._write = dying_write
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 99}, target)
else:
    def dying(f):
        f.write(b"partial safetensors"); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(target, dying)
"""


@pytest.mark.parametrize("kind", ["ckpt", "pattern"])
def test_kill_during_write_leaves_the_previous_file_intact(tmp_path, kind):
    """Guarantee 1 (atomic files): a SIGKILL in the middle of writing last.ckpt / a pattern file
    leaves the previous good file byte-for-byte, and the leftover temp file is not a `last*.ckpt`
    that `--ckpt_path last` could pick."""
    from lit_heads.checkpoint_io import AtomicCheckpointIO
    from lit_heads.heads.pattern import Pattern

    if kind == "ckpt":
        target = tmp_path / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, target)
    else:
        target = tmp_path / "heads" / "pattern.safetensors"
        Pattern(torch.arange(6.0).view(2, 3), {"step": 4}).save(target)
    before = target.read_bytes()

    result = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target), kind], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert target.read_bytes() == before
    if kind == "ckpt":
        assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 4
        leftovers = [p.name for p in target.parent.iterdir() if p != target]
        assert leftovers and all(p.startswith(".last.ckpt.") and not p.endswith(".ckpt") for p in leftovers)
    else:
        assert Pattern.load(target).meta["step"] == 4


def test_atomic_checkpoint_io_is_used_by_fit_and_respects_a_configured_plugin(tmp_path, tiny_llama_dir, monkeypatch):
    """`lit_heads fit` writes checkpoints through AtomicCheckpointIO, and a config with its own
    `trainer.plugins` still works (the atomic IO is installed by a callback, not by replacing plugins)."""
    from lit_heads.checkpoint_io import AtomicCheckpointIO
    from lit_heads.cli import main

    monkeypatch.chdir(tmp_path)
    calls = []
    original = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda self, c, p, storage_options=None: (calls.append(Path(p).name), original(self, c, p, storage_options))[1])
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.model", str(tiny_llama_dir),
            "--model.num_generate", "0", "--data.train_size", "4", "--data.val_size", "2", "--data.max_length", "96",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", "ck", "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "1",
            # a plugin of the user's own: here a cluster-environment plugin
            "--trainer.plugins", "lightning.pytorch.plugins.environments.LightningEnvironment"]
    main(args)
    assert "last.ckpt" in calls and len(calls) >= 2
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 2
