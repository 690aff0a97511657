"""`lit_heads compare` on a tiny Llama: two arms run, the report's numbers are read back and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lit_heads.cli import main
from lit_heads.commands.compare import Arm, parse_arm
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError
from lit_heads.heads.restrict import HeadRestriction
from tiny_models import reference_losses

ROOT = Path(__file__).resolve().parents[1]
# 6 validation samples in batches of 4 and 2: a mean of batch means would differ from val/loss.
TINY = {
    "model": {"num_generate": 4, "max_new_tokens": 4},
    "data": {"train_size": 16, "val_size": 6, "max_length": 128, "batch_size": 4},
    "trainer": {"max_steps": 4, "val_check_interval": 2},
}


@pytest.mark.parametrize("spec, arm", [
    ("full", Arm("full")),
    ("top:0.1", Arm("top:0.1", "top", fraction=0.1)),
    ("bottom:10%", Arm("bottom:10%", "bottom", fraction=0.1)),
    ("random:8", Arm("random:8", "random", top_k=8)),
    ("list:heads.npy", Arm("list:heads.npy", "list", heads="heads.npy")),
    ("lora:8", Arm("lora:8", "lora", lora_r=8)),
    ("lora:16:q_proj, v_proj", Arm("lora:16:q_proj, v_proj", "lora", lora_r=16, lora_targets=("q_proj", "v_proj"))),
])
def test_parse_arm(spec, arm):
    assert parse_arm(spec) == arm


@pytest.mark.parametrize("spec", ["best:0.1", "top", "top:", "top:many", "full:1", "lora", "lora:", "lora:x", "lora:8:",
                                  "lora:8:q_proj,,v_proj"])
def test_bad_arm_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="arm"):
        parse_arm(spec)


def test_bad_arm_size_exits_2_before_any_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(ROOT / "configs" / "compare.yaml"), "--arms", "full", "top:1.5", "--output",
              str(tmp_path)])
    assert exit_info.value.code == 2
    assert "fraction=1.5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "full").exists()


@pytest.mark.parametrize("arm, needle", [
    ("lora:0", "the rank r must be an integer >= 1"),
    ("lora:4:q_proj,attn_out", "'attn_out' is not a linear layer of the model (LlamaForCausalLM). Its linear layers "
                               "are named: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head."),
    ("lora:4x", "Cannot read the LoRA rank '4x'"),
])
def test_bad_lora_arm_exits_2_before_any_fit(tiny_llama_dir, tmp_path, capsys, arm, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(ROOT / "configs" / "compare.yaml"), "--arms", "full", arm,
              "--output", str(tmp_path), "--model.model", str(tiny_llama_dir)])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fit_flags_that_compare_owns_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(ROOT / "configs" / "compare.yaml"), "--arms", "full", "--output",
              str(tmp_path),
              "--trainer.logger.init_args.name", "x"])
    assert exit_info.value.code == 2 and "--trainer.logger.init_args.name" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_three_arms_writes_a_report_with_checked_numbers(tiny_llama_dir, tmp_path, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_overlay(TINY)
    out = tmp_path / "cmp"
    main(["compare", "--config", str(ROOT / "configs" / "compare.yaml"), "--config", "tiny.yaml",
          "--arms", "full", "top:0.25", "lora:4", "--output", str(out), "--name", "test-group",
          "--n_score_samples", "8", "--model.model", str(tiny_llama_dir)])

    report = (out / "report.md").read_text()
    assert "| full |" in report and "| top:0.25 |" in report
    assert "| lora:4 | LoRA r=4 on q_proj, k_proj, v_proj, o_proj |" in report
    assert (out / "losses.png").stat().st_size > 0 and (out / "ap_change.png").stat().st_size > 0
    full, top, lora = json.loads((out / "results.json").read_text())

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    total = sum(p.numel() for p in base.parameters())
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), train_size=16, val_size=6, max_length=128, batch_size=4, seed=42)
    base_loss = reference_losses(tiny_llama_dir, dm.val_dataloader())[0]
    heads = [tuple(h) for h in json.loads((out / "top-0.25" / "heads" / "selection.json").read_text())["heads"]]
    assert len(heads) == 2  # 25% of 2 layers x 4 heads
    assert full["trainable"] == full["total"] == total
    assert top["trainable"] == HeadRestriction(base, heads).apply().count_trainable() < full["trainable"]
    assert top["total"] == total
    # LoRA: r x (in + out) for q, k, v, o of each layer, from the base model's own shapes; % of the base model.
    layers = [m for n, m in base.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    assert len(layers) == 8 and lora["trainable"] == sum(4 * (m.in_features + m.out_features) for m in layers)
    assert lora["total"] == total and lora["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "n_modules": 8,
                                                        "modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert f"| {lora['trainable']:,} | {100 * lora['trainable'] / total:.3f}% |" in report
    for arm in (full, top, lora):
        assert arm["optimizer_state"] == 2 * arm["trainable"]  # AdamW: exp_avg + exp_avg_sq
        summary = json.loads((out / Path(arm["directory"]).name / "fit_summary.json").read_text())
        assert arm["val_loss"] == summary["after"]["val_loss"] and arm["steps"] == 4
        assert arm["ap_change"]["mse_vs_start"] > 0 and arm["step_time_s"] > 0 and arm["peak_rss_mb"] > 100
        assert [s for s, _ in arm["val_curve"]] == [2, 4]
        # The curve's last point (val/loss at step 4) and the summary's "after" (same weights) are one number,
        # and the base line of the plot is the same definition on the base model.
        assert arm["val_curve"][-1][1] == pytest.approx(summary["after"]["val_loss"], rel=1e-5)
        assert arm["val_loss_before"] == pytest.approx(base_loss, rel=1e-5)
        # The table shows the numbers read back from the run folders.
        assert f"| {arm['name']} |" in report and f"{arm['trainable']:,}" in report
        assert f"{arm['val_loss']:.4f}" in report

    # Same shared config in every arm, per-arm folders and one W&B group.
    for slug, name in (("full", "full"), ("top-0.25", "top:0.25"), ("lora-4", "lora:4")):
        overrides = yaml.safe_load((out / slug / "arm.yaml").read_text())["trainer"]
        # save_dir null: the logger follows the arm's run folder (default_root_dir), like every output.
        assert overrides["default_root_dir"] == str(out / slug)
        assert overrides["logger"]["init_args"] == {**overrides["logger"]["init_args"], "group": "test-group",
                                                    "name": name, "save_dir": None}
        assert all("dirpath" not in (c.get("init_args") or {}) for c in overrides["callbacks"])
        assert (out / slug / "heads" / "ap_history.safetensors").is_file() and (out / slug / "metrics.jsonl").is_file()
        assert next((out / slug / "wandb").glob("offline-run-*")).is_dir()
    assert not (out / "full" / "heads" / "selection.json").exists()
    lora_callback = yaml.safe_load((out / "lora-4" / "arm.yaml").read_text())["trainer"]["callbacks"][-2]
    assert lora_callback == {"class_path": "lit_heads.callbacks.lora.LoRAFinetuning",
                             "init_args": {"alpha": None, "dropout": 0.0, "targets": None, "r": 4}}
    assert not (tmp_path / "runs").exists()  # nothing went to the shared config's run folder


def test_an_arm_without_gradable_answers_shows_not_applicable_not_zero(tmp_path):
    from lit_heads.analysis.report import ArmResult, table_rows
    from lit_heads.callbacks.fit_summary import format_summary

    arm = ArmResult(name="full", directory=tmp_path, trainable=10, total=10, optimizer_state=20, val_loss_before=2.0,
                    val_loss=1.0, val_acc=None, val_acc_n=0, step_time_s=0.1, peak_rss_mb=100.0, peak_cuda_mb=None,
                    steps=3)
    assert table_rows([arm])[0][6] == "n/a (no gradable answers)"
    graded = {**vars(arm), "val_acc": 0.5, "val_acc_n": 4}
    assert table_rows([ArmResult(**graded)])[0][6] == "0.500 (n=4)"
    summary = {"steps": 3, "before": {"val_loss": 2.0, "val_acc": None, "val_acc_n": 0},
               "after": {"val_loss": 1.0, "val_acc": None, "val_acc_n": 0}}
    assert "  val accuracy    n/a (no gradable answers)" in format_summary(summary).splitlines()
