"""Bad input across config, data, model, callback options and commands: each case must end with a
clear message (checked by content: it names the bad thing and what would be right), exit status 2
from the CLI (never a traceback), and leave every good output of an earlier run byte-for-byte.

The commands run in-process through `lit_heads.cli.main` (a traceback would surface here as an
exception other than SystemExit and fail the test); one case runs as a real subprocess to pin the
process exit status and the absence of a traceback on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_overlay
from lit_heads.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# A tiny fit on top of the quickstart (conftest's tiny overlay: 2 steps on 8 samples); `callbacks`
# replaces the quickstart's list per case.
CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"dirpath": "runs/quickstart/checkpoints", "save_last": True, "save_top_k": 0}}
HR = "lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning"
MONITOR = "lit_heads.callbacks.head_monitor.HeadActivationMonitor"

# Outputs of an earlier, good run in the same folders; no failing command may touch them.
GOOD_OUTPUTS = {
    "runs/quickstart/checkpoints/last.ckpt": b"good checkpoint bytes",
    "runs/quickstart/config.yaml": b"seed_everything: 42  # the config of the good run\n",
    "runs/quickstart/fit_summary.json": b'{"steps": 60}',
    "runs/quickstart/metrics.jsonl": b'{"step": 1, "train/loss": 2.0}\n',
    "runs/quickstart/heads/ap_history.safetensors": b"good history",
    "runs/quickstart/heads/selection.json": b'{"heads": [[0, 1]]}',
    "runs/quickstart/export/model.safetensors": b"good export",
    "out/ap/pattern.safetensors": b"good pattern",
    "out/ap/summary.json": b'{"good": true}',
    "out/compose/compose.json": b'{"good": true}',
    "mix.jsonl": b'{"prompt": "good", "response": "mix"}\n',
}


def callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


@pytest.fixture
def ws(tmp_path, tiny_llama_dir, monkeypatch):
    """A work folder with the good outputs and the input files the cases point at."""
    monkeypatch.chdir(tmp_path)
    for rel, data in GOOD_OUTPUTS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    from lit_heads.heads.pattern import Pattern

    Pattern(torch.rand(3, 5), {"model": "a 3-layer, 5-head model"}).save(tmp_path / "other_shape.safetensors")
    Pattern(torch.rand(2, 4), {"model": "tiny"}).save(tmp_path / "tiny_pattern.safetensors")
    (tmp_path / "heads.json").write_text("[[0, 1], [1, 2]]")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok", "response": "ok"}\n{"prompt": "caf\xe9", "response": '
                                            b'"x"}\n')
    (tmp_path / "types.jsonl").write_text('{"prompt": "2+2?", "response": 4}\n')
    (tmp_path / "keys.jsonl").write_text('{"input": "2+2?", "target": "4"}\n')
    (tmp_path / "empty_response.jsonl").write_text("".join(f'{{"prompt": "q{i}", "response": ""}}\n' for i in range(8)))
    long_prompt = " ".join(["word"] * 200)
    (tmp_path / "long_prompt.jsonl").write_text("".join(json.dumps({"prompt": f"{i} {long_prompt}",
                                                                    "response": "ok"}) + "\n" for i in range(8)))
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    # A checkpoint of another model: the weights are the 32-wide tiny Llama of tiny_models, while its
    # hyper-parameters name the 64-wide fixture model (e.g. a model folder re-exported since). Its
    # hyper-parameters naming the fixture keep LightningCLI (which applies a checkpoint's
    # hyper-parameters to the model config) on the fixture model.
    from tiny_models import tiny_model

    other = tiny_model("llama")
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()},
                "hyper_parameters": {"model": str(tiny_llama_dir)}, "global_step": 5, "epoch": 0},
               tmp_path / "other_model.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "other_model.ckpt").read_bytes()[:2000])
    (tmp_path / "text.gguf").write_text("not a model\n")
    weightless = tmp_path / "weightless"  # a model folder whose weights were not copied
    weightless.mkdir()
    for f in tiny_llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (weightless / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LIT_HEADS_CACHE", str(tmp_path / "cache"))  # de-quantized GGUF copies stay in the test
    return tmp_path


def truncated_gguf(ws: Path) -> Path:
    """The bundled GGUF file cut after 3 MB: a whole header, the first tensor's data cut short (an
    interrupted download)."""
    from lit_heads.models import bundled_gguf

    path = ws / "cut.gguf"
    with open(bundled_gguf(), "rb") as f:
        path.write_bytes(f.read(3_000_000))
    return path


def fit_args(ws: Path, model_dir: Path, extra_callback: dict | None = None, *flags: str) -> list[str]:
    callbacks = [CHECKPOINT, *([extra_callback] if extra_callback else [])]
    write_tiny_overlay(ws / "tiny.yaml",
                       {"trainer": {"logger": False, "enable_progress_bar": False, "callbacks": callbacks}})
    return ["fit", "--config", str(QUICKSTART), "--config", "tiny.yaml", "--model.model", str(model_dir), *flags]


def snapshot(ws: Path) -> dict[str, bytes]:
    return {rel: (ws / rel).read_bytes() for rel in GOOD_OUTPUTS}


# id -> (argv builder, substrings the message must contain)
CASES = {
    # ---- callback options: head selection ---------------------------------------------------
    "top_k-larger-than-heads": (
        lambda ws, m: fit_args(ws, m, callback(HR, strategy="top", top_k=99)),
        ["top_k=99", "2 layers x 4 heads = 8 heads", "from 1 to 8"]),
    "negative-fraction": (
        lambda ws, m: fit_args(ws, m, callback(HR, fraction=-0.5)),
        ["fraction=-0.5", "greater than 0 and at most 1"]),
    "fraction-above-1": (
        lambda ws, m: fit_args(ws, m, callback(HR, fraction=1.5)),
        ["fraction=1.5", "greater than 0 and at most 1"]),
    "unknown-selection-strategy": (
        lambda ws, m: fit_args(ws, m, callback(HR, strategy="best")),
        ["Unknown head-selection strategy 'best'", "top, bottom, random, list"]),
    "head-list-and-top_k-together": (
        lambda ws, m: fit_args(ws, m, callback(HR, strategy="list", heads="heads.json", top_k=2)),
        ["strategy 'list'", "top_k=2", "Remove top_k"]),
    "pattern-file-of-another-model-shape": (
        lambda ws, m: fit_args(ws, m, callback(HR, strategy="top", top_k=2, scores="other_shape.safetensors")),
        ["3 layers x 5 heads", "2 layers x 4 heads", "another model"]),
    "missing-head-list-file": (
        lambda ws, m: fit_args(ws, m, callback(HR, strategy="list", heads="no_such_heads.npy")),
        ["no_such_heads.npy does not exist"]),
    # ---- callback options: monitor, NaN guard -------------------------------------------------
    "empty-probe-set": (
        lambda ws, m: fit_args(ws, m, callback(MONITOR, probe_size=0)),
        ["probe_size must be >= 1", "empty"]),
    "monitor-every_n_steps-0": (
        lambda ws, m: fit_args(ws, m, callback(MONITOR, every_n_steps=0)),
        ["every_n_steps must be >= 1, got 0"]),
    "nan-guard-negative-max_skips": (
        lambda ws, m: fit_args(ws, m, callback("lit_heads.callbacks.nan_guard.NanGuard", skip=True, max_skips=-1)),
        ["max_skips must be >= 0, got -1"]),
    # ---- data ---------------------------------------------------------------------------------
    "non-utf8-data-file": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "latin1.jsonl"),
        ["latin1.jsonl:2", "not valid UTF-8", "0xe9"]),
    "wrong-field-type-in-record": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "types.jsonl"),
        ["types.jsonl:1", "field 'response' must be a string", "int"]),
    "unknown-record-format-option": (
        lambda ws, m: fit_args(ws, m, None, "--data.format", "csv"),
        ["Unknown data format 'csv'", "prompt_response"]),
    "record-keys-of-no-known-format": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "keys.jsonl"),
        ["keys.jsonl:1", "cannot tell the record format", "'input'", "'target'"]),
    "response-fully-truncated": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "long_prompt.jsonl", "--data.max_length", "64",
                               "--data.val_split", "0.25"),
        ["max_length=64", "no response", "Raise max_length"]),
    "empty-data-file": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "empty.jsonl"),
        ["empty.jsonl", "holds no records"]),
    "unknown-generated-task": (
        lambda ws, m: fit_args(ws, m, None, "--data.train", "generated:nosuch"),
        ["Unknown generated task 'nosuch'", "arithmetic"]),
    # ---- config -------------------------------------------------------------------------------
    "wrong-option-type": (
        lambda ws, m: fit_args(ws, m, None, "--data.batch_size", "four"),
        ["data.batch_size", "four"]),
    "out-of-range-option": (
        lambda ws, m: fit_args(ws, m, None, "--data.val_split", "1.5"),
        ["val_split must be in [0, 1), got 1.5"]),
    "missing-config-file": (
        lambda ws, m: ["fit", "--config", "no_such_config.yaml"],
        ["no_such_config.yaml"]),
    # ---- model and checkpoints ----------------------------------------------------------------
    "unknown-architecture": (
        lambda ws, m: ["ap", "--model", str(unsupported_model_dir(ws, m)), "--data", "generated:arithmetic",
                       "--n_samples", "2"],
        ["mamba (MambaForCausalLM)", "has an attention module", "no attention heads to score or train"]),
    "checkpoint-of-another-model": (
        lambda ws, m: fit_args(ws, m, None, "--ckpt_path", "other_model.ckpt"),
        ["other_model.ckpt does not fit this model", "another shape", "[97, 32] in the checkpoint"]),
    "ap-on-checkpoint-of-another-model": (
        lambda ws, m: ["ap", "--model", "other_model.ckpt", "--data", "generated:arithmetic", "--n_samples", "2",
                       "--output", "out/ap"],
        ["other_model.ckpt does not fit model", "trained from another model"]),
    "missing-checkpoint": (
        lambda ws, m: fit_args(ws, m, None, "--ckpt_path", "runs/quickstart/checkpoints/nope.ckpt"),
        ["nope.ckpt does not exist", "last.ckpt"]),
    "ckpt_path-is-a-directory": (
        lambda ws, m: fit_args(ws, m, None, "--ckpt_path", "runs/quickstart/checkpoints"),
        ["runs/quickstart/checkpoints is a directory", "The checkpoints in it: last.ckpt"]),
    "model-folder-without-weights": (
        lambda ws, m: fit_args(ws, ws / "weightless"),
        ["weightless", "has a config.json but no weights", "model.safetensors"]),
    "not-a-gguf-file": (
        lambda ws, m: ["ap", "--model", "text.gguf", "--data", "generated:arithmetic", "--n_samples", "2", "--output",
                       "out/ap"],
        ["text.gguf is not a GGUF file", "magic"]),
    "truncated-gguf-file": (
        lambda ws, m: ["ap", "--model", str(truncated_gguf(ws)), "--data", "generated:arithmetic", "--n_samples", "2",
                       "--output", "out/ap"],
        ["cut.gguf cannot be read as a model", "truncated or corrupt"]),
    "truncated-checkpoint-as-model": (
        lambda ws, m: fit_args(ws, ws / "truncated.ckpt"),
        ["truncated.ckpt cannot be read", "truncated or not a Lightning checkpoint"]),
    "ap-on-truncated-checkpoint": (
        lambda ws, m: ["ap", "--model", "truncated.ckpt", "--data", "generated:arithmetic", "--n_samples", "2",
                       "--output", "out/ap"],
        ["truncated.ckpt cannot be read", "truncated or not a Lightning checkpoint"]),
    # ---- outputs and commands -----------------------------------------------------------------
    "ap-output-not-writable": (
        lambda ws, m: ["ap", "--model", str(m), "--data", "generated:arithmetic", "--n_samples", "2", "--output",
                       "blocker/ap"],
        ["blocker/ap is not writable", "--output"]),
    "ap-zero-samples": (
        lambda ws, m: ["ap", "--model", str(m), "--n_samples", "0", "--output", "out/ap"],
        ["--n_samples", "must be >= 1"]),
    "compose-pattern-shapes-differ": (
        lambda ws, m: ["compose", "--target", "tiny_pattern.safetensors", "--bases", "a=other_shape.safetensors",
                       "--output", "out/compose"],
        ["shape"]),
    "compare-unknown-arm-strategy": (
        lambda ws, m: ["compare", "--config", str(QUICKSTART), "--arms", "full", "best:0.1", "--output", "out/compare"],
        ["Cannot read arm 'best:0.1'", "top, bottom or random"]),
    "compare-missing-fit-config": (
        lambda ws, m: ["compare", "--config", "no_such_fit.yaml", "--arms", "full", "top:0.5", "--output",
                       "out/compare"],
        ["no_such_fit.yaml does not exist"]),
    "mix-unknown-rule": (
        lambda ws, m: ["mix", "--alpha", "arithmetic=1", "--pools", "arithmetic=generated:arithmetic", "--rule",
                       "median", "--output", "mix.jsonl"],
        ["Unknown mix rule 'median'", "clip"]),
}


def unsupported_model_dir(ws: Path, tokenizer_dir: Path) -> Path:
    """A tiny Mamba (a causal LM transformers knows, without attention heads to find)."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    path = ws / "tiny-mamba"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, state_size=4)
    MambaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error_with_exit_2_and_no_output_touched(case, ws, tiny_llama_dir, capsys):
    build, expected = CASES[case]
    argv = build(ws, tiny_llama_dir)
    before = snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    missing = [s for s in expected if s not in err]
    assert not missing, f"message lacks {missing}:\n{err[-2000:]}"
    assert snapshot(ws) == before, "a failing command changed a good output"


@pytest.mark.parametrize("data", ["keys.jsonl", "no_such_file.jsonl", "generated:nosuch"])
def test_bad_data_fails_before_the_model_loads_or_a_wandb_run_starts(ws, tiny_llama_dir, monkeypatch, capsys, data):
    """With the quickstart's W&B logger (offline) and the real model path: the data is checked first."""
    loaded = []

    def load_model(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("lit_heads.module.load_model", load_model)
    before = snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--model.model", str(tiny_llama_dir), "--data.train", data])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert data.split(":")[-1] in err
    assert not loaded
    assert not (ws / "runs/quickstart/wandb").exists() and not (ws / "wandb").exists()
    assert snapshot(ws) == before and sorted(p.name for p in (ws / "runs/quickstart").iterdir()) == [
        "checkpoints", "config.yaml", "export", "fit_summary.json", "heads", "metrics.jsonl"]


def test_late_failure_keeps_the_good_config_yaml(ws, tiny_llama_dir, capsys):
    before = (ws / "runs/quickstart/config.yaml").read_bytes()
    with pytest.raises(SystemExit):
        main(fit_args(ws, tiny_llama_dir, None, "--ckpt_path", "other_model.ckpt"))
    assert (ws / "runs/quickstart/config.yaml").read_bytes() == before


def test_empty_response_is_a_clear_error(ws, tiny_llama_dir, capsys):
    before = snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(ws, tiny_llama_dir, None, "--data.train", "empty_response.jsonl"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "empty_response.jsonl:1" in err and "empty" in err
    assert snapshot(ws) == before


def test_truncated_checkpoint_is_a_clear_error(ws, tiny_llama_dir, capsys):
    before = snapshot(ws)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(ws, tiny_llama_dir, None, "--ckpt_path", "truncated.ckpt"))
    assert exit_info.value.code == 2
    assert "truncated.ckpt cannot be read" in capsys.readouterr().err
    assert snapshot(ws) == before


def test_truncated_checkpoint_is_a_clear_error_from_the_checkpoint_io(tmp_path):
    """What the Trainer itself reports for an unreadable checkpoint (reached from Python, or from the
    CLI once the fix above is in): a ModelError naming the file, not a torch traceback."""
    from lit_heads.checkpoint_io import AtomicCheckpointIO
    from lit_heads.errors import ModelError

    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100)}, "global_step": 3}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ModelError, match=r"cut\.ckpt cannot be read .* truncated"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "cut.ckpt")


@pytest.mark.slow
def test_checkpoint_of_another_model_fails_cleanly_in_a_real_process(ws, tiny_llama_dir):
    """The process exit status itself is 2 and stderr holds the message, not a traceback."""
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli",
                             *fit_args(ws, tiny_llama_dir, None, "--ckpt_path", "other_model.ckpt")],
                            cwd=ws, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "lit_heads: error: Checkpoint other_model.ckpt does not fit this model" in result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(ws)
    assert ({k: v for k, v in after.items() if not k.endswith("config.yaml")}
            == {k: v for k, v in GOOD_OUTPUTS.items() if not k.endswith("config.yaml")})
