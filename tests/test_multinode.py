"""Multi-node on one machine: `fit --trainer.num_nodes 2 --trainer.devices 1`, started as two
processes the way a launcher starts two nodes (MASTER_ADDR, MASTER_PORT, NODE_RANK: Lightning's
LightningEnvironment; gloo on CPU), gives the monitor statistics, the head selection and the final
weights of one process on the same global batch. Without a launcher's environment, num_nodes > 1 is
refused instead of waiting forever for the other nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_heads.cli import main
from lit_heads.heads.history import PatternHistory
from test_distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
               "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME")

# Every response has the same tokens: each rank's token-averaged loss then weighs like its share of
# the global batch's tokens, so DDP's mean over ranks is the one-process loss of the global batch.
RECORDS = [{"prompt": f"What is {a} plus {b}? Say it in words, please.", "response": "It is a small number."}
           for a, b in zip(range(3, 19), range(40, 8, -2))]

# data.seed = seed_everything: under DDP Lightning replaces the DataModule's shuffling sampler by its
# DistributedSampler, which draws the same permutation (randperm of seed + epoch) from the global seed.
FIT = """
seed_everything: 7
model:
  model: {model}
  num_generate: 0
  scheduler: null
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: 0.01, weight_decay: 0.1}}
data: {{train: data.jsonl, train_size: 16, val: data.jsonl, val_size: 4, max_length: 96, batch_size: {batch}, seed: 7}}
trainer:
  accelerator: cpu
  devices: 1
  num_nodes: {nodes}
  max_steps: 3
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: run
  logger:
    class_path: lit_heads.loggers.WandbLogger
    init_args: {{save_dir: run, name: nodes}}
  callbacks:
    - class_path: lit_heads.callbacks.head_monitor.HeadActivationMonitor
      init_args: {{every_n_steps: 1, probe: val, probe_size: 4, top_k: 3, log_table: false, dirpath: run/heads}}
    - class_path: lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning
      init_args: {{strategy: top, top_k: 3, n_score_samples: 8, dirpath: run/heads}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: run/checkpoints, save_last: true, save_top_k: 0}}
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", **extra}


def _workspace(path: Path, model_dir, nodes: int, batch: int) -> Path:
    path.mkdir()
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (path / "fit.yaml").write_text(FIT.format(model=model_dir, nodes=nodes, batch=batch))
    return path


def _results(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {
        "selection": json.loads((run / "heads" / "selection.json").read_text()),
        "history": PatternHistory.load(run / "heads" / "ap_history.safetensors"),
        "monitor": [{k: v for k, v in r.items() if k.startswith("heads/") or k == "step"} for r in rows
                    if any(k.startswith("heads/") for k in r)],
        "weights": ckpt["state_dict"],
        "global_step": ckpt["global_step"],
    }


@pytest.mark.slow
def test_two_nodes_of_one_device_equal_one_process_on_the_same_global_batch(tmp_path, tiny_llama_dir):
    cmd = [sys.executable, "-m", "lit_heads.cli", "fit", "--config", "fit.yaml"]
    one = _workspace(tmp_path / "one", tiny_llama_dir, nodes=1, batch=4)
    single = subprocess.run(cmd, cwd=one, env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    two = _workspace(tmp_path / "two", tiny_llama_dir, nodes=2, batch=2)  # 2 nodes x 2 = the same global batch
    port = str(_free_port())
    nodes = [subprocess.Popen(cmd, cwd=two, env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{err[-3000:]}"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1][1]  # really one world of two processes

    a, b = _results(one / "run"), _results(two / "run")
    assert a["global_step"] == b["global_step"] == 3
    assert b["selection"]["heads"] == a["selection"]["heads"] and len(a["selection"]["heads"]) == 3
    torch.testing.assert_close(torch.tensor(b["selection"]["ranking_scores"]),
                               torch.tensor(a["selection"]["ranking_scores"]), rtol=1e-6, atol=0)
    assert b["history"].steps == a["history"].steps == [0, 1, 2, 3]
    for pa, pb in zip(a["history"].scores, b["history"].scores):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-7)
    assert [r["step"] for r in b["monitor"]] == [r["step"] for r in a["monitor"]]
    assert {r["step"] for r in a["monitor"] if "heads/gini" in r} == {0, 1, 2, 3}  # + the selection's row at 0
    for ra, rb in zip(a["monitor"], b["monitor"]):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    assert a["weights"].keys() == b["weights"].keys()
    deltas = [k for k in a["weights"] if k.endswith(".delta")]
    assert deltas and any(a["weights"][k].abs().max() > 1e-3 for k in deltas)  # the heads trained
    for key in a["weights"]:
        torch.testing.assert_close(b["weights"][key], a["weights"][key], rtol=1e-4, atol=1e-6, msg=key)


def test_num_nodes_without_a_launcher_is_refused_instead_of_waiting(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    _workspace(tmp_path / "ws", tiny_llama_dir, nodes=2, batch=2)
    monkeypatch.chdir(tmp_path / "ws")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "fit.yaml"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "trainer.num_nodes is 2, but this process was not started by a multi-node launcher" in err
    assert "MASTER_ADDR, MASTER_PORT, NODE_RANK not set" in err and "torchrun --nnodes 2" in err
    assert not (tmp_path / "ws" / "run").exists()  # refused before any run folder was made


def test_the_launch_check_accepts_the_variables_set_by_hand_or_by_torchrun(monkeypatch):
    from lit_heads.errors import ConfigError
    from lit_heads.launch import check_launch_environment

    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    check_launch_environment({"num_nodes": 1})  # one node needs no launcher
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="NODE_RANK not set"):
        check_launch_environment({"num_nodes": 2})
    monkeypatch.setenv("NODE_RANK", "1")
    check_launch_environment({"num_nodes": 2})
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")  # what torchrun sets for TorchElasticEnvironment
    check_launch_environment({"num_nodes": 2})
