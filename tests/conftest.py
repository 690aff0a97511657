"""Shared fixtures: tiny random models saved as Hugging Face directories with the bundled tokenizer,
so the whole stack (CLI, module, data) runs on them in seconds."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py
os.environ.setdefault("WANDB_MODE", "offline")  # never prompt or reach the network from tests
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    # Integration tests (real bundled model) last, so unit failures show up first.
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from lit_heads.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bundled_tokenizer):
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads) and the bundled tokenizer, on disk."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = bundled_tokenizer
    model = tiny_model(
        "llama", attn_implementation="sdpa", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        head_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# The tiny fit that CLI tests lay over a shipped config (`--config <shipped> --config tiny.yaml`): tiny
# data, few steps, no generation. Each test passes what it needs on top as overrides.
TINY_OVERLAY = {
    "model": {"num_generate": 0},
    "data": {"train_size": 8, "val_size": 4, "max_length": 96, "batch_size": 2},
    "trainer": {"max_steps": 2},
}


def monitored_overrides(first_callback: dict) -> dict:
    """Overrides for a 4-step fit that validates every 2 steps and runs `first_callback`, then the head
    monitor (probe of 6 samples and the free pattern, every 2 steps) and the export, under runs/quickstart/."""
    return {
        "data": {"train_size": 16, "val_size": 8, "max_length": 128, "batch_size": 4},
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "callbacks": [
                first_callback,
                {"class_path": "lit_heads.callbacks.head_monitor.HeadActivationMonitor",
                 "init_args": {"every_n_steps": 2, "probe_size": 6, "free": True, "top_k": 3,
                               "dirpath": "runs/quickstart/heads"}},
                {"class_path": "lit_heads.callbacks.export.ExportHF",
                 "init_args": {"dirpath": "runs/quickstart/export"}},
            ],
        },
    }


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in: nested dicts merge key by key, anything else (lists
    included) replaces the base value."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_tiny_overlay(path: Path, overrides: dict | None = None) -> Path:
    """Write TINY_OVERLAY with `overrides` deep-merged over it as YAML to `path`; returns `path`."""
    path = Path(path)
    path.write_text(yaml.safe_dump(deep_merge(TINY_OVERLAY, overrides or {}), sort_keys=False))
    return path


@pytest.fixture
def tiny_overlay(tmp_path):
    """`tiny_overlay(overrides=None, name="tiny.yaml")`: writes the tiny overlay (TINY_OVERLAY with the
    nested-dict `overrides` deep-merged over it) to tmp_path/name and returns its path."""

    def write(overrides: dict | None = None, name: str = "tiny.yaml") -> Path:
        return write_tiny_overlay(tmp_path / name, overrides)

    return write
