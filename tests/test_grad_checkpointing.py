"""Gradient checkpointing (reentrant and non-reentrant) changes no head-related number: the probe AP
and the free AP of the monitor, `compute_ap`, the head selection and head-restricted training's
weights all equal the same run without it (tiny models, float32, CPU)."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from lit_heads.callbacks.head_monitor import HeadActivationMonitor
from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning
from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError
from lit_heads.heads.scoring import compute_ap
from lit_heads.models import load_model
from lit_heads.module import SFTModule

DATA = dict(train_size=8, val_size=4, max_length=96, batch_size=4, seed=3)
MODES = {"off": {}, "non_reentrant": {"gradient_checkpointing": True},
         "reentrant": {"gradient_checkpointing": True, "gradient_checkpointing_reentrant": True}}


class NoShuffle(SFTDataModule):
    def train_dataloader(self):
        self._ensure_setup()
        return self._loader(self._train_data, shuffle=False)


class RecordingMonitor(HeadActivationMonitor):
    """The monitor, keeping each free AP it reduces (it logs only their statistics)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.free_patterns: list[torch.Tensor | None] = []

    def _reduce_free(self, trainer, shape):
        free = super()._reduce_free(trainer, shape)
        self.free_patterns.append(free)
        return free


class CheckpointingSeen(L.Callback):
    """Whether checkpointing really ran in the training steps: the first decoder layer's MLP
    runs again during the backward."""

    def __init__(self):
        self.calls: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self._n = 0
        pl_module.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: setattr(self, "_n", self._n + 1))

    def on_train_batch_start(self, *_):
        self._n = 0

    def on_train_batch_end(self, *_):
        self.calls.append(self._n)


def fit(model_dir, root, mode: str, restricted: bool, max_steps: int = 3):
    L.seed_everything(0)
    module = SFTModule(model=str(model_dir), num_generate=0, scheduler=None,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), **MODES[mode])
    monitor = RecordingMonitor(every_n_steps=1, probe_size=4, free=True, log_table=False, dirpath=str(root / "heads"))
    seen = CheckpointingSeen()
    callbacks = [seen, monitor]  # seen first: its batch-end count precedes the monitor's probe forward
    if restricted:
        callbacks.append(HeadRestrictedFinetuning(strategy="top", top_k=3, n_score_samples=4, dirpath=str(root / "hr")))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        default_root_dir=str(root), callbacks=callbacks)
    trainer.fit(module, datamodule=NoShuffle(tokenizer=str(model_dir), **DATA))
    weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    selected = callbacks[-1].selected if restricted else None
    return {"history": monitor.history, "free": monitor.free_patterns, "weights": weights, "selected": selected,
            "layer_calls": seen.calls}


def assert_same_run(a: dict, b: dict) -> None:
    assert a["history"].steps == b["history"].steps
    for pa, pb in zip(a["history"].scores, b["history"].scores):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    assert len(a["free"]) == len(b["free"]) and all(f is not None for f in a["free"][1:])
    for fa, fb in zip(a["free"], b["free"]):
        assert (fa is None) == (fb is None)
        if fa is not None:
            torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-7)
    assert a["selected"] == b["selected"]
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("restricted", [False, True], ids=["full", "head_restricted"])
def test_monitor_selection_and_weights_equal_the_run_without_checkpointing(tiny_llama_dir, tmp_path, restricted):
    runs = {mode: fit(tiny_llama_dir, tmp_path / mode, mode, restricted) for mode in MODES}
    assert runs["off"]["layer_calls"] == [1, 1, 1]
    for mode in ("non_reentrant", "reentrant"):
        assert runs[mode]["layer_calls"] == [2, 2, 2], mode  # the layer was recomputed in each backward
        assert_same_run(runs[mode], runs["off"])
    # The runs trained: the weights moved, and the free AP is not the probe AP of the same step.
    base = load_model(str(tiny_llama_dir)).state_dict()
    moved = [k for k, v in runs["off"]["weights"].items() if k in base and not torch.equal(v, base[k])]
    assert moved
    if restricted:
        assert len(runs["off"]["selected"]) == 3
        assert not any(".mlp." in k for k in moved)  # only the selected heads' attention rows train


@pytest.mark.parametrize("reentrant", [False, True])
def test_compute_ap_on_a_model_with_checkpointing_in_train_mode_equals_plain(tiny_llama_dir, reentrant):
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), **DATA)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    plain = compute_ap(load_model(str(tiny_llama_dir)), batches, progress=False).scores
    model = load_model(str(tiny_llama_dir))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    checkpointed = compute_ap(model, batches, progress=False).scores
    torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=0)
    assert model.training and model.model.layers[0].gradient_checkpointing  # left as found


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_module_option_maps_to_torch_checkpoint_use_reentrant(tiny_llama_dir, reentrant, monkeypatch):
    import torch.utils.checkpoint as tc

    seen = []
    real = tc.checkpoint

    def spy(function, *args, use_reentrant=None, **kwargs):
        seen.append(use_reentrant)
        return real(function, *args, use_reentrant=use_reentrant, **kwargs)

    monkeypatch.setattr("transformers.modeling_utils.checkpoint", spy)
    module = SFTModule(str(tiny_llama_dir), num_generate=0, gradient_checkpointing=True,
                       gradient_checkpointing_reentrant=reentrant)
    module.model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    module(ids, torch.ones_like(ids)).sum().backward()
    assert seen == [reentrant] * 2  # one call per decoder layer, with the chosen use_reentrant


def test_reentrant_without_checkpointing_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="gradient_checkpointing_reentrant is true but gradient_checkpointing"):
        SFTModule("no/such-model", gradient_checkpointing_reentrant=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.model", "no/such-model", "--model.gradient_checkpointing_reentrant", "true",
              "--data.train", "generated:arithmetic", "--trainer.max_steps", "1"])
    assert exit_info.value.code == 2
    assert "gradient_checkpointing_reentrant is true" in capsys.readouterr().err
    # Nothing written but the run folder's lock (taken before any option is read, released at exit).
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [".lit_heads.lock"]
