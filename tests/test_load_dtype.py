"""Weights load lean: `model.dtype` (or a `*-true` precision) is the dtype `from_pretrained` reads the
weights in, never float32 then a cast; the load happens in Lightning's `configure_model`; a dtype the
run cannot use is refused before any weight is read."""

from __future__ import annotations

import inspect
import shutil

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

import lit_heads.module
from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError
from lit_heads.models import load_model, weights_dtype
from lit_heads.module import SFTModule

DATA = dict(train_size=4, val_size=2, max_length=128, batch_size=2, seed=1)


@pytest.fixture
def loads(monkeypatch):
    """Every from_pretrained call of lit_heads: its dtype, the dtypes of the model it returned, and
    whether Lightning's configure_model hook was running."""
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = real(cls, *args, **kwargs)
        hooks = {frame.function for frame in inspect.stack()}
        calls.append({"dtype": kwargs.get("dtype"), "params": {p.dtype for p in model.parameters()},
                      "in_configure_model": "_call_configure_model" in hooks})
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize(("precision", "dtype", "expected"), [
    ("32-true", None, torch.float32),
    ("bf16-true", None, torch.bfloat16),
    ("bf16-true", "bfloat16", torch.bfloat16),
    ("bf16-mixed", None, torch.float32),  # mixed precision keeps float32 master weights
])
def test_a_fit_loads_the_weights_once_in_configure_model_in_the_precision_dtype(
        tiny_llama_dir, loads, precision, dtype, expected):
    module = SFTModule(str(tiny_llama_dir), num_generate=0, dtype=dtype)
    assert loads == [] and "model" not in module._modules  # constructing the module reads no weight
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, SFTDataModule(tokenizer=str(tiny_llama_dir), **DATA))
    assert loads == [{"dtype": expected, "params": {expected}, "in_configure_model": True}]
    assert {p.dtype for p in module.model.parameters()} == {expected}
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"].float().item()))
    trainer.test(module, SFTDataModule(tokenizer=str(tiny_llama_dir), **DATA))
    assert len(loads) == 1  # configure_model again (test after fit) keeps the loaded model


def test_code_outside_a_trainer_gets_the_model_on_first_access(tiny_llama_dir, loads):
    module = SFTModule(str(tiny_llama_dir), num_generate=0, dtype="bfloat16")
    assert loads == []
    assert module.model.dtype == torch.bfloat16 and module.model is module.model
    assert len(loads) == 1 and not loads[0]["in_configure_model"]
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())


@pytest.mark.parametrize(("name", "precision", "needle"), [
    ("float8", None, "Unknown model dtype 'float8'"),
    ("bfloat16", "32-true", "trainer.precision 32-true keeps its weights in float32"),
    ("float16", "bf16-true", "set trainer.precision to 16-true"),
    ("bfloat16", "bf16-mixed", "bf16-mixed keeps its weights in float32"),
])
def test_a_dtype_that_disagrees_with_the_precision_is_refused(name, precision, needle):
    with pytest.raises(ConfigError, match=needle):
        weights_dtype(name, precision)


def test_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match="Tesla V100-SXM2-16GB has none"):
        weights_dtype(None, "bf16-true", "cuda:0")
    assert weights_dtype(None, "16-true", "cuda:0") == torch.float16
    assert weights_dtype("float32", None, "cuda:0") == torch.float32


@pytest.mark.parametrize(("args", "needle"), [
    (["--model.dtype", "float8"], "Unknown model dtype 'float8'"),
    (["--model.dtype", "float16", "--trainer.precision", "bf16-true"], "model.dtype is float16 but trainer.precision"),
])
def test_cli_refuses_a_bad_dtype_with_exit_2_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                                                     args, needle):
    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(lit_heads.module, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.model", str(tiny_llama_dir), "--data.train", "generated:arithmetic",
              "--data.train_size", "4", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert needle in err and "Traceback" not in err


def test_a_cached_float32_model_loads_in_bfloat16_from_a_bfloat16_copy_written_once(tiny_llama_dir, tmp_path,
                                                                                   monkeypatch, loads):
    monkeypatch.setenv("LIT_HEADS_CACHE", str(tmp_path))
    cached = tmp_path / "tiny-0123"
    shutil.copytree(tiny_llama_dir, cached)
    reference = {k: v.to(torch.bfloat16) for k, v in load_model(str(cached)).state_dict().items()}
    assert not (tmp_path / "tiny-0123-bfloat16").exists()  # float32 reads the cache itself

    model = load_model(str(cached), dtype="bfloat16")
    copy = tmp_path / "tiny-0123-bfloat16"
    assert (copy / "config.json").is_file()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    stamp = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    load_model(str(cached), dtype="bfloat16")
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == stamp  # read, not written again
    # A model outside the cache (the user's own directory) is read as it is: no copy beside it.
    load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert not tiny_llama_dir.with_name(f"{tiny_llama_dir.name}-bfloat16").exists()


def test_a_resume_may_switch_checkpointing_but_not_the_weights_dtype(tmp_path):
    from jsonargparse import Namespace

    from lit_heads.resume import Resume

    saved = {"model": "m", "gradient_checkpointing": False, "gradient_checkpointing_reentrant": False, "dtype": None}

    def compare(**now):
        config = Namespace(model=Namespace(**{**saved, **now}), data=Namespace(), trainer=Namespace(max_steps=1))
        return Resume(tmp_path / "last.ckpt", {"hyper_parameters": saved}).compare(config).refused

    assert compare(gradient_checkpointing=True, gradient_checkpointing_reentrant=True) == []
    assert compare(dtype="bfloat16") == ["model.dtype: None in the checkpoint, 'bfloat16' now"]
