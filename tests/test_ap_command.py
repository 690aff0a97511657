"""`lit_heads ap` on a tiny Llama: files written and read back, numbers against compute_ap, config style, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_heads.commands.ap import ap
from lit_heads.data import SFTDataModule, load_source
from lit_heads.heads.pattern import Pattern
from lit_heads.heads.scoring import compute_ap


def test_ap_writes_pattern_heatmap_and_summary_matching_compute_ap(tmp_path, tiny_llama_dir):
    out = tmp_path / "ap"
    summary = ap(model=str(tiny_llama_dir), data="generated:arithmetic,string", output=str(out), n_samples=6,
                 batch_size=4)

    pattern = Pattern.load(out / "pattern.safetensors")
    assert pattern.shape == (2, 4) and pattern.meta["n_samples"] == 6
    assert pattern.meta["data"] == "generated:arithmetic,string"
    assert np.array_equal(np.load(out / "pattern.npy"), pattern.numpy())
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["top_heads"] == summary["top_heads"] and len(on_disk["top_heads"]) == 8

    # Independent recomputation: same samples, another batch size (AP is a per-sample mean).
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), batch_size=5)
    examples = load_source("generated:arithmetic,string", size=6, seed=42)
    expected = compute_ap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), dm.make_dataloader(examples),
                          progress=False)
    torch.testing.assert_close(pattern.scores, expected.scores, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_ap_reads_a_yaml_config_and_flags_override_it(tmp_path, tiny_llama_dir):
    cfg = tmp_path / "ap.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata: generated:code\nn_samples: 3\noutput: {tmp_path / 'from_yaml'}\n")
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli", "ap", "--config", str(cfg), "--batch_size", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 layers x 4 heads, 3 samples" in result.stdout
    assert Pattern.load(tmp_path / "from_yaml" / "pattern.safetensors").meta["n_samples"] == 3


@pytest.mark.slow
def test_ap_errors_are_clear_and_exit_2(tmp_path, tiny_llama_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli", "ap", "--model", str(tiny_llama_dir), "--output",
                             str(blocker / "sub")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not writable" in result.stderr and "--output" in result.stderr
    assert blocker.read_text() == "keep me"
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli", "ap", "--model", str(tiny_llama_dir), "--precision",
                             "fp8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "fp8" in result.stderr and "32-true" in result.stderr
