"""2-process DDP (gloo, CPU): AP, monitor values and head selection equal one process on the same
global data; only rank 0 writes files and reports; a failing rank ends the run instead of hanging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORLD = 2
# Every test here launches processes (DDP workers or `lit_heads fit` on 2 ranks): slow.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    from tiny_models import sft_batch

    return [sft_batch(lengths=(12, 9, 5), prompt_lengths=(4, 3, 1), seed=s) for s in range(4)]


def _ap_worker(rank, port, out_dir):
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.heads.selection import select_heads
    from tiny_models import tiny_model

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mine = _batches()[rank::WORLD]  # each rank scores its share; compute_ap all-reduces
        pattern = compute_ap(tiny_model("llama"), mine, progress=False)
        heads = select_heads("top", 2, 4, top_k=3, scores=pattern.scores)
        torch.save({"scores": pattern.scores, "n": pattern.meta["n_samples"], "heads": heads},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ap_and_head_selection_under_ddp_equal_one_process(tmp_path):
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.heads.selection import select_heads
    from tiny_models import tiny_model

    mp.spawn(_ap_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = compute_ap(tiny_model("llama"), _batches(), progress=False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert got["n"] == 12  # the union of both ranks' samples
        # Float64 sums in another order, then float32: equal to float32 rounding.
        torch.testing.assert_close(got["scores"], single.scores, rtol=1e-6, atol=0)
        assert got["heads"] == select_heads("top", 2, 4, top_k=3, scores=single.scores)


DDP_FIT = """
seed_everything: 7
model: {{model: {model}, num_generate: 0}}
data: {{train: "generated:arithmetic,code", train_size: 16, val_size: 4, max_length: 96, batch_size: 2, seed: 3}}
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 2
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: run
  logger:
    class_path: lit_heads.loggers.WandbLogger
    init_args: {{save_dir: run, name: ddp}}
  callbacks:
    - class_path: lit_heads.callbacks.head_monitor.HeadActivationMonitor
      init_args: {{every_n_steps: 1, probe: val, probe_size: 4, top_k: 3, log_table: false, dirpath: run/heads}}
    - class_path: lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning
      init_args: {{strategy: top, top_k: 3, n_score_samples: 8, dirpath: run/heads}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: run/checkpoints, save_last: true, save_top_k: -1, every_n_train_steps: 1}}
    - class_path: lit_heads.callbacks.fit_summary.FitSummary
{extra}
"""


def ddp_fit(tmp_path, model_dir, extra="", timeout=420) -> subprocess.CompletedProcess:
    (tmp_path / "ddp.yaml").write_text(DDP_FIT.format(model=model_dir, extra=extra))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lit_heads.cli", "fit", "--config", "ddp.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ddp_fit_monitor_and_selection_equal_one_process_and_only_rank0_writes(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from lit_heads.data import SFTDataModule
    from lit_heads.heads.history import PatternHistory
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.heads.selection import select_heads

    result = ddp_fit(tmp_path, tiny_llama_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"

    # One process on the same global data: the selection ranks heads by the base model's AP on the
    # first 8 training examples; the monitor's step-0 pattern is the base model's AP on the probe.
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), train="generated:arithmetic,code", train_size=16, val_size=4,
                       max_length=96, batch_size=2, seed=3)
    dm.setup("fit")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rank_ap = compute_ap(base, dm.make_dataloader(dm.train_examples[:8]), progress=False).scores
    selection = json.loads((run / "heads" / "selection.json").read_text())
    assert [tuple(h) for h in selection["heads"]] == select_heads("top", 2, 4, top_k=3, scores=rank_ap)
    torch.testing.assert_close(torch.tensor(selection["ranking_scores"]), rank_ap, rtol=1e-6, atol=0)

    history = PatternHistory.load(run / "heads" / "ap_history.safetensors")
    assert history.steps == [0, 1, 2]
    probe_ap = compute_ap(base, dm.make_dataloader(dm.val_examples[:4]), progress=False).scores
    torch.testing.assert_close(history.scores[0], probe_ap, rtol=1e-5, atol=1e-8)
    # ...and the final pattern is the AP of the final weights (rank 0's checkpoint) on the whole probe.
    from lit_heads.models import load_model

    final = load_model(str(run / "checkpoints" / "last.ckpt"))
    torch.testing.assert_close(history.scores[-1],
                               compute_ap(final, dm.make_dataloader(dm.val_examples[:4]), progress=False).scores,
                               rtol=1e-4, atol=1e-7)

    # Only rank 0 logs and writes: each monitor step logged once, one W&B run, one summary.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "heads/gini" in r]
    assert [r["step"] for r in logged] == [0, 1, 2]
    assert abs(logged[0]["heads/gini"] - __import__("lit_heads.heads.stats",
                                                    fromlist=["x"]).summary(probe_ap)["gini"]) < 1e-6
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert (result.stdout + result.stderr).count("lit_heads fit summary") == 1


class FailOnRank(L.Callback):
    """Test-only: raise on one rank at one step, as a data or hardware fault on one node would."""

    def __init__(self, rank: int = 1, step: int = 1):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"simulated failure on rank {self.rank} at step {self.step}")


def test_a_failing_rank_ends_the_run_with_its_message_instead_of_hanging(tmp_path, tiny_llama_dir):
    extra = "    - class_path: test_distributed.FailOnRank\n      init_args: {rank: 1, step: 1}"
    # Without the failure the whole fit takes well under the timeout; a hang would hit it
    # (subprocess.TimeoutExpired fails the test).
    result = ddp_fit(tmp_path, tiny_llama_dir, extra, timeout=300)
    assert result.returncode != 0
    assert "simulated failure on rank 1 at step 1" in result.stderr
