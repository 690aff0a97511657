"""NaN/inf loss: the run stops naming the step and the last good checkpoint stays intact; with
`skip: true` the bad batch is skipped and training completes with finite weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_heads.cli import main

ROOT = Path(__file__).resolve().parents[1]
BAD_STEP = 2
TINY = {
    "data": {"train_size": 12, "val_size": 2},
    "trainer": {"max_steps": 4, "logger": False, "enable_progress_bar": False},
}


class PoisonLossAt(L.Callback):
    """Test-only: make the logits (hence the loss) non-finite at optimizer step `step`, as an
    overflow would, without touching any weight."""

    def __init__(self, step: int, value: float = float("nan")):
        self.step, self.value, self.handle = step, value, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.handle = pl_module.model.lm_head.register_forward_hook(lambda m, i, out: out * self.value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def run(tiny_overlay, model_dir, value: str, extra: dict | None = None) -> list[str]:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ck", "save_last": True, "save_top_k": -1, "every_n_train_steps": 1}},
        {"class_path": "test_nan_guard.PoisonLossAt", "init_args": {"step": BAD_STEP, "value": float(value)}},
        {"class_path": "lit_heads.callbacks.export.ExportHF", "init_args": {"dirpath": "export"}},
        *([extra] if extra else []),
    ]
    tiny_overlay({**TINY, "trainer": {**TINY["trainer"], "callbacks": callbacks}})
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml", "--model.model",
            str(model_dir)]


# (inf logits give a NaN cross-entropy, so the injected fault is NaN; an inf loss takes the same path:
# torch.isfinite is False for both.)
@pytest.mark.parametrize("value", ["nan"])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama_dir,
                                                                                  tiny_overlay, monkeypatch, capsys,
                                                                                  value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(run(tiny_overlay, tiny_llama_dir, value))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"the training loss is {value} at step {BAD_STEP} (epoch 0, batch {BAD_STEP})" in err
    assert "last.ckpt" in err and "skip: true" in err  # where to resume from, and the alternative
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert last["global_step"] == BAD_STEP  # no checkpoint was written for the bad step
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    # last.ckpt is the good step-2 checkpoint, byte for byte: nothing rewrote it after the NaN.
    good = (tmp_path / "ck" / f"epoch=0-step={BAD_STEP}.ckpt").read_bytes()
    assert (tmp_path / "ck" / "last.ckpt").read_bytes() == good
    assert not (tmp_path / "export").exists()  # a failed run exports nothing


def test_skip_true_skips_the_bad_batch_and_finishes(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = {"class_path": "lit_heads.callbacks.nan_guard.NanGuard", "init_args": {"skip": True, "max_skips": 3}}
    main(run(tiny_overlay, tiny_llama_dir, "nan", extra))
    before = torch.load(tmp_path / "ck" / f"epoch=0-step={BAD_STEP}.ckpt", weights_only=False)
    after = torch.load(tmp_path / "ck" / f"epoch=0-step={BAD_STEP + 1}.ckpt", weights_only=False)
    # The skipped step changed no weight and no optimizer moment (grad None, not zero: AdamW's
    # decay and momentum would otherwise still move the weights).
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["callbacks"]["NanGuard"]["skipped_steps"] == [BAD_STEP]
    final = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 4 and all(torch.isfinite(t).all() for t in final["state_dict"].values())
    # training went on
    assert not torch.equal(final["state_dict"]["model.lm_head.weight"], after["state_dict"]["model.lm_head.weight"])
    assert (tmp_path / "export" / "config.json").is_file()
