from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lit_heads.errors import ConfigError, DataError
from lit_heads.heads import FORMULA_VERSION, Pattern, heatmap


def _pattern():
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).abs()
    scores[0, 0] = 1e-30  # subnormal-ish values must survive bit-exactly
    return Pattern(scores, {"model": "tiny", "data": "gsm8k", "step": 200, "n_samples": 64, "extra": {"k": [1, 2]}})


def test_defaults_and_dtype():
    p = Pattern(torch.ones(2, 3, dtype=torch.float64))
    assert p.scores.dtype == torch.float32 and p.shape == (2, 3)
    assert p.meta == {"model": None, "data": None, "step": None, "n_samples": None, "formula_version": FORMULA_VERSION}
    with pytest.raises(ConfigError, match="2-D"):
        Pattern(torch.ones(6))


def test_safetensors_round_trip_bit_exact(tmp_path):
    p = _pattern()
    path = p.save(tmp_path / "sub" / "ap.safetensors")
    q = Pattern.load(path)
    assert torch.equal(q.scores, p.scores) and q.scores.dtype == torch.float32
    assert q.meta == p.meta and q.meta["extra"] == {"k": [1, 2]} and q.meta["formula_version"] == "ap-eq2-v1"
    # Atomic write: no temp files left next to it.
    assert sorted(os.listdir(tmp_path / "sub")) == ["ap.safetensors"]


def test_failed_save_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "ap.safetensors"
    _pattern().save(path)
    before = path.read_bytes()
    bad = Pattern(torch.zeros(5, 3), {"model": object()})
    with pytest.raises(ConfigError, match="JSON"):
        bad.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ap.safetensors"]


def test_npy_round_trip(tmp_path):
    p = _pattern()
    p.to_npy(tmp_path / "ap.npy")
    raw = np.load(tmp_path / "ap.npy")
    assert raw.shape == (5, 3) and raw.dtype == np.float32 and np.array_equal(raw, p.scores.numpy())
    q = Pattern.from_npy(tmp_path / "ap.npy", model="llama-7b", data="gsm8k")
    assert torch.equal(q.scores, p.scores) and q.meta["model"] == "llama-7b" and q.meta["data"] == "gsm8k"
    # The authors' release ships float64 arrays: accepted and converted.
    np.save(tmp_path / "f64.npy", np.arange(6, dtype=np.float64).reshape(2, 3))
    assert Pattern.from_npy(tmp_path / "f64.npy").scores.dtype == torch.float32
    np.save(tmp_path / "bad.npy", np.zeros(4))
    with pytest.raises(DataError, match="shape"):
        Pattern.from_npy(tmp_path / "bad.npy")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Pattern.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="safetensors"):
        Pattern.load(tmp_path / "junk.safetensors")


def test_check_shape_names_both_shapes():
    p = _pattern()
    assert p.check_shape(5, 3) is p
    with pytest.raises(ConfigError) as e:
        p.check_shape(30, 9)
    assert "5 layers x 3 heads" in str(e.value) and "30 layers x 9 heads" in str(e.value)


def test_heatmap_is_valid_png(tmp_path):
    path = heatmap(_pattern(), tmp_path / "ap.png", title="AP")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100
    assert os.listdir(tmp_path) == ["ap.png"]
    # Plain arrays work too.
    heatmap(np.eye(4), tmp_path / "eye.png")
    assert (tmp_path / "eye.png").read_bytes()[:4] == b"\x89PNG"
