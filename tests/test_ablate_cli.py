"""`lit_heads ablate` as a user runs it: YAML config and flags, the ranking it used against an independent
recomputation, pattern files with ΔAP and |ΔAP|, bad input refused with exit status 2 before the model
loads, and one run on the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_heads.cli import main
from lit_heads.heads.pattern import Pattern
from lit_heads.heads.selection import select_heads

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"results.json": b'{"good": true}', "report.md": b"# the good report\n"}


def run_cli(args: list[str]) -> None:
    main(["ablate", *args])


@pytest.mark.slow
def test_ablate_reads_a_yaml_config_and_ranks_by_the_ap_it_computed(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the logger of configs/ablate.yaml still mirrors to metrics.jsonl
    out = tmp_path / "out"
    cfg = tmp_path / "ablate.yaml"
    cfg.write_text(
        f"model: {tiny_llama_dir}\ndata: generated:arithmetic,string\nn_samples: 5\nap_samples: 4\n"
        f"num_generate: 0\nbatch_size: 3\noutput: {out}\nk: [4]\n"
    )
    run_cli(["--config", str(ROOT / "configs" / "ablate.yaml"), "--config", str(cfg), "--k", "1", "2",
             "--seeds", "3", "4", "--logger.save_dir", str(tmp_path / "wandb")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "[ablate] 8/8 bottom k=2" in printed and "2 layers x 4 heads" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["config"]["k"] == [1, 2] and results["config"]["seeds"] == [3, 4]
    assert results["mask"] == "mean" and results["n_samples"] == 5 and results["base"]["accuracy"] is None
    assert [(r["selection"], r["seed"], r["k"]) for r in results["rows"]] == [
        ("top", None, 1),
        ("top", None, 2),
        ("random", 3, 1),
        ("random", 3, 2),
        ("random", 4, 1),
        ("random", 4, 2),
        ("bottom", None, 1),
        ("bottom", None, 2),
    ]
    for name in ("report.md", "results.csv", "ablation.png", "scores.safetensors"):
        assert (out / name).is_file()
    logged = {m["step"]: m for m in map(json.loads, (tmp_path / "wandb" / "metrics.jsonl").read_text().splitlines())}
    for entry in results["summary"]:
        assert logged[entry["k"]]["ablate/top/loss_increase"] == pytest.approx(entry["top"]["loss_increase"]["mean"])
        assert logged[entry["k"]]["ablate/random/loss_increase_max"] == pytest.approx(
            entry["random"]["loss_increase"]["max"]
        )

    # Independent recomputation of the ranking: AP of the same model on the same first 4 samples.
    from transformers import AutoModelForCausalLM

    from lit_heads.data import SFTDataModule, load_source
    from lit_heads.heads import compute_ap

    examples = load_source("generated:arithmetic,string", size=5, seed=42)[:4]
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), batch_size=2, max_length=512)
    expected = compute_ap(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), dm.make_dataloader(examples), progress=False
    )
    used = Pattern.load(out / "scores.safetensors")
    torch.testing.assert_close(used.scores, expected.scores, rtol=1e-4, atol=1e-7)
    top2 = next(r for r in results["rows"] if r["selection"] == "top" and r["k"] == 2)
    assert [tuple(h) for h in top2["heads"]] == select_heads("top", 2, 4, top_k=2, scores=expected.scores)


def test_ablate_ranks_by_abs_delta_of_pattern_files(tmp_path, tiny_llama_dir):
    after = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    before = torch.tensor([[0.1, 0.9, 0.3, 0.4], [0.5, 0.6, 0.0, 0.8]])  # Δ: -0.7 at (0,1), +0.7 at (1,2), else 0
    Pattern(after, {"model": "tiny"}).save(tmp_path / "after.safetensors")
    Pattern(before, {"model": "tiny"}).save(tmp_path / "before.safetensors")
    out = tmp_path / "out"
    run_cli(
        f"--model {tiny_llama_dir} --data generated:string --n_samples 3 --num_generate 0 --mask zero "
        f"--scores {tmp_path / 'after.safetensors'} --scores_before {tmp_path / 'before.safetensors'} --scores_abs "
        f"--selections top --k 2 --output {out}".split()
    )
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    assert row["heads"] == [[0, 1], [1, 2]]  # the two heads that changed, one up, one down
    torch.testing.assert_close(Pattern.load(out / "scores.safetensors").scores, (after - before).abs())
    assert results["scores"]["name"].startswith("|") and "before.safetensors" in results["scores"]["name"]


def test_a_run_that_dies_keeps_the_evaluations_it_measured(tmp_path, tiny_llama_dir, monkeypatch):
    def broken_report(results, output):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr("lit_heads.analysis.ablation.write_report", broken_report)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        run_cli(["--model", str(tiny_llama_dir), "--data", "generated:string", "--n_samples", "2",
                 "--num_generate", "0", "--mask", "zero", "--selections", "top", "bottom", "--k", "1", "3",
                 "--output", str(out)])  # fmt: skip
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    assert [(r["selection"], r["k"]) for r in partial["rows"]] == [("top", 1), ("top", 3), ("bottom", 1), ("bottom", 3)]
    assert [e["k"] for e in partial["summary"]] == [1, 3] and partial["base"]["loss"] > 0


@pytest.fixture
def refused(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Run `ablate` with bad options: it must exit 2 before any model weights load, with the message on
    stderr, and leave the earlier report files byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in GOOD.items():
        (out / name).write_bytes(data)
    Pattern(torch.rand(3, 5), {"model": "a 3-layer, 5-head model"}).save(tmp_path / "other_shape.safetensors")
    (tmp_path / "plain.jsonl").write_text('{"prompt": "Say hi.", "response": "hi"}\n')

    def fail_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("lit_heads.module.load_model", fail_load)

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["--model", str(tiny_llama_dir), "--data", "generated:arithmetic", "--n_samples", "3",
                     "--k", "1", "2", "--output", str(out), *args])  # fmt: skip
        assert exit_info.value.code == 2
        for name, data in GOOD.items():
            assert (out / name).read_bytes() == data
        return capsys.readouterr().err

    return run


def test_k_larger_than_the_number_of_heads_is_refused(refused):
    err = refused("--k", "1", "9")
    assert "k = 9 is larger than the number of heads of this model (8)" in err and "from 1 to 8" in err


def test_unknown_mask_mode_is_refused(refused):
    err = refused("--mask", "half")
    assert "--mask 'half' is not a mask mode" in err and "'zero'" in err and "'mean'" in err


def test_scores_of_another_model_are_refused(refused, tmp_path):
    err = refused("--scores", str(tmp_path / "other_shape.safetensors"))
    assert "3 layers x 5 heads" in err and "this model has 2 layers x 4 heads" in err


def test_other_bad_options_are_refused(refused, tmp_path):
    assert "does not exist" in refused("--scores", str(tmp_path / "missing.safetensors"))
    assert "middle" in refused("--selections", "top", "middle")
    assert "--num_generate 0" in refused("--data", str(tmp_path / "plain.jsonl"), "--num_generate", "1")


@pytest.mark.slow
def test_bad_input_exits_2_without_a_traceback(tmp_path, tiny_llama_dir):
    command = [sys.executable, "-m", "lit_heads.cli", "ablate", "--model", str(tiny_llama_dir), "--k", "0",
               "--output", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "every k must be a whole number of heads >= 1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_ablate_on_the_bundled_model_writes_its_report(tmp_path):
    out = tmp_path / "ablate"
    command = [sys.executable, "-m", "lit_heads.cli", "ablate", "--model", "smollm2-135m",
               "--data", "generated:math_code", "--n_samples", "3", "--ap_samples", "2", "--k", "2", "--seeds", "0",
               "--num_generate", "1", "--max_new_tokens", "4", "--batch_size", "3", "--output", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["model"]["n_layers"] == 30 and results["model"]["n_heads"] == 9
    assert [(r["selection"], r["k"]) for r in results["rows"]] == [("top", 2), ("random", 2), ("bottom", 2)]
    assert results["n_graded"] == 1 and all(r["loss"] > 0 and r["accuracy"] is not None for r in results["rows"])
    report = (out / "report.md").read_text()
    assert "| 2 |" in report and "30 layers x 9 heads" in report
    assert (out / "ablation.png").stat().st_size > 1000
