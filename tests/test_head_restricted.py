"""HeadRestrictedFinetuning in real fits on tiny models: exactness, selection, optimizer state,
checkpoints and resume, export, 2-process DDP through the CLI, and option errors."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_heads.callbacks.export import ExportHF
from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning
from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError
from lit_heads.heads.layout import find_heads
from lit_heads.heads.pattern import Pattern
from lit_heads.heads.restrict import HeadDelta
from lit_heads.heads.scoring import compute_ap
from lit_heads.heads.selection import save_head_list, select_heads
from lit_heads.models import load_model
from lit_heads.module import SFTModule

ROOT = Path(__file__).resolve().parents[1]
N_SCORE = 8
DATA = dict(train_size=8, val_size=4, max_length=128, batch_size=4, seed=3)


class NoShuffle(SFTDataModule):
    """Fixed training order (the tests compare runs batch by batch)."""

    def train_dataloader(self):
        self._ensure_setup()
        return self._loader(self._train_data, shuffle=False)


class Inspect(L.Callback):
    """What the optimizer and the frozen weights look like at the end of training, before the merge."""

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.frozen_with_grad = [n for n, p in pl_module.named_parameters()
                                 if id(p) not in trained and p.grad is not None]
        self.requires_grad = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.trained = trained
        self.state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
        self.deltas = sum(isinstance(m, HeadDelta) for m in pl_module.modules())


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, bundled_tokenizer):
    """GPT-2 (fused c_attn Conv1D, biases, tied embeddings) with the bundled tokenizer, on disk."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = bundled_tokenizer
    model = tiny_model("gpt2", vocab_size=len(tok), n_positions=256, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fit(model_dir, root, callback, *, max_steps=4, ckpt_path=None, extra=(), data=DATA, logger=False):
    L.seed_everything(0)
    module = SFTModule(
        model=str(model_dir), num_generate=0, scheduler=None,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
    )
    data = NoShuffle(tokenizer=str(model_dir), **data)
    inspect = Inspect()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
        callbacks=[callback, inspect, *extra],
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in extra),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold a partial
    return module, inspect


def expected_mask(model, heads, kv="group") -> dict[str, torch.Tensor]:
    """Entries a restriction to `heads` may train, from the layout's slices (tested in test_heads_layout)."""
    layout = find_heads(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for l, h in heads:
        layer = layout.layers[l]
        slices = layer.query_slices(h) + layer.output_slices(h)
        if kv == "group":
            slices += layer.kv_slices(layer.kv_group_of(h))
        for s in slices:
            masks[names[id(s.param)]] |= s.mask()
    return masks


def ap_top(model_dir, k: int) -> list[tuple[int, int]]:
    """The top-k heads by AP of the base model on the first N_SCORE training examples, computed here."""
    data = SFTDataModule(tokenizer=str(model_dir), **DATA)
    data.setup("fit")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    scores = compute_ap(model, data.make_dataloader(data.train_examples[:N_SCORE]), progress=False).scores
    return select_heads("top", *scores.shape, top_k=k, scores=scores)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_trains_exactly_the_top_heads(arch, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_llama_dir" if arch == "llama" else "tiny_gpt2_dir")
    callback = HeadRestrictedFinetuning(strategy="top", top_k=3, n_score_samples=N_SCORE)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    module, inspect = fit(model_dir, tmp_path, callback, extra=[checkpoint, ExportHF(str(tmp_path / "export"))])

    # Heads: the AP top-3 of the base model on the training data, recomputed independently.
    assert callback.selected == ap_top(model_dir, 3)
    selection = json.loads((tmp_path / "heads" / "selection.json").read_text())
    assert [tuple(h) for h in selection["heads"]] == callback.selected
    assert (tmp_path / "heads" / "selection_mask.png").stat().st_size > 0

    # During training: only the deltas were trainable and optimized; frozen tensors had no grad;
    # optimizer state (exp_avg + exp_avg_sq) is exactly twice the trained scalars.
    count = selection["trainable"]
    assert inspect.deltas > 0 and inspect.trained == inspect.requires_grad
    assert inspect.frozen_with_grad == []
    assert inspect.state_numel == 2 * count

    # After fit: merged plain model; every weight outside the selection bit-identical, inside moved.
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    masks = expected_mask(base, callback.selected)
    assert count == sum(int(m.sum()) for m in masks.values())
    after = dict(module.model.named_parameters())
    assert after.keys() == masks.keys() and not any(isinstance(m, HeadDelta) for m in module.modules())
    for name, p in base.named_parameters():
        mask = masks[name]
        assert torch.equal(after[name][~mask], p[~mask]), f"{name} moved outside the selection"
        assert (after[name][mask] != p[mask]).all(), f"{name} did not train inside the selection"

    # Export: plain HF, logits equal to the in-memory model; the delta checkpoint loads merged too.
    ids = torch.tensor([[1, 400, 401, 402, 2, 17]])
    module.model.eval()
    with torch.no_grad():
        in_memory = module.model(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")(ids).logits
        from_ckpt = load_model(str(tmp_path / "ckpt" / "last.ckpt"))(ids).logits
    assert torch.equal(exported, in_memory)
    assert torch.equal(from_ckpt, in_memory)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert any(".parametrizations." in k for k in ckpt["state_dict"])  # the checkpoint holds deltas
    assert [tuple(h) for h in ckpt["callbacks"]["HeadRestrictedFinetuning"]["heads"]] == callback.selected


def test_random_kv_none_and_head_list(tiny_llama_dir, tmp_path):
    callback = HeadRestrictedFinetuning(strategy="random", fraction=0.25, kv="none", seed=5)
    module, _ = fit(tiny_llama_dir, tmp_path / "a", callback, max_steps=2)
    assert callback.selected == select_heads("random", 2, 4, fraction=0.25, seed=5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    masks = expected_mask(base, callback.selected, kv="none")
    for name, p in base.named_parameters():
        assert torch.equal(dict(module.model.named_parameters())[name][~masks[name]], p[~masks[name]]), name
    assert callback.summary["by_kind"]["k"] == callback.summary["by_kind"]["v"] == 0

    heads_file = save_head_list(tmp_path / "heads.npy", [(1, 3), (0, 0)])  # LoFiT-style [K, 2] array
    listed = HeadRestrictedFinetuning(strategy="list", heads=str(heads_file), fraction=None)
    fit(tiny_llama_dir, tmp_path / "b", listed, max_steps=1)
    assert listed.selected == [(0, 0), (1, 3)]


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    # One batch per epoch: every step sees the same batch, so the comparison does not depend on
    # how Lightning replays a partly consumed data loader after a resume (not what is tested here).
    data = {**DATA, "train_size": 4}

    def callback():
        return HeadRestrictedFinetuning(strategy="top", top_k=2, n_score_samples=4)

    straight, _ = fit(tiny_llama_dir, tmp_path / "straight", callback(), max_steps=4, data=data)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tiny_llama_dir, tmp_path / "first", callback(), max_steps=2, extra=[ckpt], data=data)
    resumed_cb = callback()
    resumed, inspect = fit(tiny_llama_dir, tmp_path / "resumed", resumed_cb, max_steps=4,
                           ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), data=data)
    assert inspect.state_numel == 2 * resumed_cb.summary["trainable"]  # optimizer state restored for the deltas only
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # validate/test of a delta checkpoint: the callback restricts the model before Lightning loads it.
    checked = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback()], default_root_dir=str(tmp_path / "validate"))
    fresh = SFTModule(model=str(tiny_llama_dir), num_generate=0, scheduler=None)
    [metrics] = checked.validate(fresh, datamodule=NoShuffle(tokenizer=str(tiny_llama_dir), **data),
                                 ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)
    assert metrics["val/loss"] < 50 and any(isinstance(m, HeadDelta) for m in fresh.modules())

    # Resuming with other heads is refused, not silently trained on a different selection.
    other = HeadRestrictedFinetuning(strategy="random", top_k=2, seed=1)
    with pytest.raises(ConfigError, match="different head selection"):
        fit(tiny_llama_dir, tmp_path / "other", other, max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
            data=data)


def test_selection_from_a_pattern_file(tiny_llama_dir, tmp_path):
    scores = torch.arange(8, dtype=torch.float32).view(2, 4)
    Pattern(scores).save(tmp_path / "p.safetensors")
    callback = HeadRestrictedFinetuning(strategy="bottom", top_k=2, scores=str(tmp_path / "p.safetensors"))
    fit(tiny_llama_dir, tmp_path, callback, max_steps=1)
    assert callback.selected == [(0, 0), (0, 1)]


@pytest.mark.parametrize("kwargs, needle", [
    ({"strategy": "best"}, "Unknown head-selection strategy 'best'"),
    ({"fraction": 1.5}, "fraction=1.5 is out of range"),
    ({"fraction": 0.0}, "out of range"),
    ({"top_k": 0}, "top_k=0 is out of range"),
    ({"top_k": 3, "fraction": 0.1}, "exactly one of top_k"),
    ({"strategy": "list", "heads": "h.json", "top_k": 2}, "strategy 'list' trains exactly"),
    ({"strategy": "list"}, "needs a head list (`heads`)"),
    ({"strategy": "random", "scores": "p.safetensors"}, "does not use scores"),
    ({"scores": "missing.safetensors"}, "does not exist"),
    ({"kv": "all"}, "unknown kv policy"),
])
def test_bad_options_are_config_errors(kwargs, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_head_list("h.json", [(0, 1)])
    Pattern(torch.ones(2, 4)).save("p.safetensors")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        HeadRestrictedFinetuning(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"strategy": "best", "top_k": 1},
    {"strategy": "random", "fraction": 0.0},
    {"strategy": "random", "top_k": 2, "fraction": 0.5},
    {"strategy": "random", "fraction": 1.5},
    {"strategy": "list", "heads": "h.json", "top_k": 2},
    {"strategy": "list"},
])
def test_callback_and_select_heads_share_one_check_of_the_options(kwargs, tmp_path, monkeypatch):
    """The callback refuses the same options with the same words as `select_heads` (one check)."""
    monkeypatch.chdir(tmp_path)
    save_head_list("h.json", [(0, 1)])
    with pytest.raises(ConfigError) as from_select:
        listed = {"heads": [(0, 1)]} if "heads" in kwargs else {}
        options = {k: v for k, v in kwargs.items() if k not in ("strategy", "heads")}
        select_heads(kwargs["strategy"], 2, 4, **options, **listed)
    with pytest.raises(ConfigError) as from_callback:
        HeadRestrictedFinetuning(**kwargs)
    assert str(from_callback.value) == f"HeadRestrictedFinetuning: {from_select.value}"


def test_top_k_larger_than_the_head_count_fails_before_any_sample_is_scored(tiny_llama_dir, tmp_path, monkeypatch):
    scored = []
    monkeypatch.setattr("lit_heads.heads.scoring.compute_ap", lambda *a, **k: scored.append(1))
    with pytest.raises(ConfigError, match=r"top_k=99 is out of range: the model has 2 layers x 4 heads = 8 heads"):
        fit(tiny_llama_dir, tmp_path, HeadRestrictedFinetuning(strategy="top", top_k=99), max_steps=1)
    assert scored == []


def test_a_refused_resume_leaves_the_run_files_byte_identical(tiny_llama_dir, tmp_path, monkeypatch):
    """Validate first, write after: resuming with other heads is refused before selection.json,
    selection_mask.png or metrics.jsonl of the run are touched."""
    from lit_heads.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    data = {**DATA, "train_size": 4}
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=run / "ckpt", save_last=True, save_top_k=0)
    first = HeadRestrictedFinetuning(strategy="top", top_k=2, n_score_samples=4, dirpath=str(run / "heads"))
    logger = WandbLogger(save_dir=str(run))
    fit(tiny_llama_dir, run, first, max_steps=2, extra=[ckpt], data=data, logger=logger)
    logger.finish()
    files = [run / "heads" / "selection.json", run / "heads" / "selection_mask.png", run / "metrics.jsonl"]
    before = {f: f.read_bytes() for f in files}
    assert json.loads(before[files[0]])["heads"] == [list(h) for h in first.selected]
    assert b"heads/n_selected" in before[files[2]]

    other = HeadRestrictedFinetuning(strategy="random", top_k=2, seed=1, dirpath=str(run / "heads"))
    with pytest.raises(ConfigError, match="different head selection"):
        fit(tiny_llama_dir, run, other, max_steps=4, ckpt_path=str(run / "ckpt" / "last.ckpt"), data=data,
            logger=WandbLogger(save_dir=str(run)))
    assert other.selected != first.selected  # the refused run really chose other heads
    assert {f: f.read_bytes() for f in files} == before


TINY_CLI = {"data": {"max_length": 128}, "trainer": {"val_check_interval": 2, "log_every_n_steps": 1}}


def cli_args(tiny_overlay, model_dir, *extra):
    return ["fit", "--config", str(ROOT / "configs" / "head_restricted.yaml"), "--config", str(tiny_overlay(TINY_CLI)),
            "--model.model", str(model_dir), *extra]


@pytest.mark.parametrize("init_args, needle", [
    ("{top_k: 99, fraction: null}", "top_k=99 is out of range"),
    ("{scores: other.safetensors}", "Activation pattern has shape 3 layers x 5 heads"),
    ("{strategy: list, heads: h.json, top_k: 2, fraction: null}", "strategy 'list' trains exactly"),
])
def test_cli_option_errors_exit_2(init_args, needle, tiny_llama_dir, tmp_path, tiny_overlay, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Pattern(torch.ones(3, 5)).save("other.safetensors")
    save_head_list("h.json", [(0, 1)])
    config = tmp_path / "hr.yaml"
    callbacks = [
        "lit_heads.callbacks.fit_summary.FitSummary",
        f"{{class_path: lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning, init_args: {init_args}}}",
    ]
    config.write_text("trainer:\n  callbacks:\n" + "".join(f"    - {c}\n" for c in callbacks))
    with pytest.raises(SystemExit) as exit_info:
        main([*cli_args(tiny_overlay, tiny_llama_dir), "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.slow
def test_ddp_two_processes_train_the_same_exact_heads(tiny_llama_dir, tmp_path, tiny_overlay):
    # The shipped config as is (top 10% of 8 heads = 1 head, AP on all 8 training examples, the
    # monitor with its free AP, checkpoint, export), on 2 CPU processes.
    (tmp_path / "optim.yaml").write_text("model:\n  optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.01, "
                                         "weight_decay: 0.1}}\n")
    args = cli_args(tiny_overlay, tiny_llama_dir, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--trainer.accelerator", "cpu", "--data.seed", str(DATA["seed"]), "--config",
                    str(tmp_path / "optim.yaml"))
    result = subprocess.run([sys.executable, "-m", "lit_heads.cli", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "head_restricted"
    selection = json.loads((run / "heads" / "selection.json").read_text())
    heads = [tuple(h) for h in selection["heads"]]
    # Each rank scored half of the samples; the all-reduced AP ranks like one process scoring all of them.
    assert heads == ap_top(tiny_llama_dir, 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    exported_model = AutoModelForCausalLM.from_pretrained(run / "export")
    exported = dict(exported_model.named_parameters())
    masks = expected_mask(base, heads)
    for name, p in base.named_parameters():
        assert torch.equal(exported[name][~masks[name]], p[~masks[name]]), f"{name} moved outside the selection"
        assert (exported[name][masks[name]] != p[masks[name]]).all(), name
    assert f"trained scalars {selection['trainable']:,}" in result.stderr + result.stdout
    ids = torch.tensor([[1, 400, 401, 402, 2, 17]])
    with torch.no_grad():
        assert torch.equal(load_model(str(run / "checkpoints" / "last.ckpt"))(ids).logits, exported_model(ids).logits)
