"""The study from config to report: plan and ETA, then each stage in turn on one loaded model, with
results.json rewritten after every stage and report.md drawn from it at the end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_heads.analysis.study.application import application
from lit_heads.analysis.study.budget import Clock, plan_budget
from lit_heads.analysis.study.config import StudyConfig
from lit_heads.analysis.study.findings import finding1, finding3_restricted
from lit_heads.analysis.study.measures import change_over_steps, composition, mean_std
from lit_heads.analysis.study.paper import PAPER
from lit_heads.analysis.study.report import write_report
from lit_heads.analysis.study.runner import StudyRunner
from lit_heads.analysis.study.tasks import REAL_COMPONENTS, generated_tasks, real_tasks


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run everything and write report.md, results.json, figures/, patterns/ and mix/ under cfg.output."""
    cfg.validate()
    out = Path(cfg.output)
    for sub in ("figures", "patterns", "mix"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    real = cfg.use_real()
    budget = plan_budget(cfg, real)
    print(f"[study] plan: {budget['sft_steps']} SFT steps, {budget['ap_samples']} pattern samples, "
          f"{budget['generated_answers']} graded answers"
          + (f", real tasks {budget['real_sft_steps']} steps" if real else "")
          + f"; estimated {budget['eta_s'] / 60:.1f} min on this machine's assumed speed ({cfg.sec_per_step} s/step)",
          flush=True)
    clock = Clock(budget["eta_s"])

    def done(stage: str) -> None:
        clock.lap(stage)
        # Partial results after every stage: a long run that dies late keeps what it measured.
        write_json(out / "results.json",
                   {**results, "seconds": {"total": clock.total, "stages": clock.stages}, "complete": False})

    runner = StudyRunner(cfg)
    tasks = generated_tasks(cfg)
    complex_task = tasks[cfg.complex_task]
    results: dict[str, Any] = {"config": asdict(cfg), "paper": PAPER, "budget": budget, "real_data": real,
                               "model": {"name": cfg.model, "layers": runner.n_layers, "heads": runner.n_heads}}

    runner.reset()
    base_accuracy = runner.accuracy(complex_task.heldout[: cfg.eval_samples])
    done("base accuracy")

    f1 = finding1(runner, tasks, cfg.sft_steps, cfg.ap_samples, track=cfg.complex_task, patterns_dir=out / "patterns")
    raw = f1.pop("_raw")
    results["finding1"] = f1
    done("finding 1 (patterns before/after SFT)")

    f2 = composition(raw["delta"][cfg.complex_task], raw["delta"], cfg.components, cfg.controls)
    results["finding2"] = {k: v for k, v in f2.items() if k != "residual"}
    np.save(out / "patterns" / "residual.npy", np.asarray(f2["residual"]))
    done("finding 2 (composition)")

    f3: dict[str, Any] = {"over_steps": change_over_steps(raw["tracked"]) if raw["tracked"] is not None else None,
                          "full_sft_accuracy": f1.pop("full_sft_accuracy"), "base_accuracy": base_accuracy}
    f3["restricted"] = finding3_restricted(runner, tasks, raw["delta"][cfg.complex_task],
                                           raw["before"][cfg.complex_task])
    results["finding3"] = f3
    done("finding 3 (change over steps, head-restricted SFT)")

    fit_for_mix = f2.get("all_basic", f2["main"])[cfg.mix_method]
    app = application(runner, tasks, fit_for_mix["alpha"], out / "mix")
    app["accuracy"] = {"base": mean_std([base_accuracy]), **app["accuracy"]}
    app["alpha_fit"] = {"method": cfg.mix_method, "bases": list(fit_for_mix["alpha"]), "r2": fit_for_mix["r2"]}
    results["application"] = app
    done("application (AP-guided mixing)")

    raw_real = None
    if real:
        print("[study] real tasks: GSM8K, HumanEval, GSM8K-as-Python", flush=True)
        from lit_heads.data import SFTDataModule

        real_data = SFTDataModule(tokenizer=runner.module.tokenizer, max_length=cfg.real_max_length,
                                  batch_size=cfg.batch_size, seed=cfg.seed)
        real_ap = SFTDataModule(tokenizer=runner.module.tokenizer, max_length=cfg.real_max_length,
                                batch_size=cfg.ap_batch_size)
        rtasks = real_tasks(cfg, real_data.encoder)
        rf1 = finding1(runner, rtasks, cfg.real_sft_steps, cfg.real_ap_samples, data=real_data, ap_data=real_ap,
                       patterns_dir=out / "patterns")
        raw_real = rf1.pop("_raw")
        # Control: a generated basic task not part of the composite (the real set has no third task).
        deltas = {**raw_real["delta"], **{c: raw["delta"][c] for c in cfg.controls}}
        rf2 = composition(raw_real["delta"]["gsm8k_python"], deltas, list(REAL_COMPONENTS), cfg.controls)
        np.save(out / "patterns" / "residual_real.npy", np.asarray(rf2["residual"]))
        results["real"] = {"finding1": rf1, "finding2": {k: v for k, v in rf2.items() if k != "residual"},
                           "sizes": {n: {"train": len(t.train), "heldout": len(t.heldout)} for n, t in rtasks.items()}}
        done("real tasks (findings 1-2)")

    results["seconds"] = {"total": clock.total, "stages": clock.stages}
    results["complete"] = True
    # Numbers first: a failure while drawing must not lose an hour of results.
    write_json(out / "results.json", results)
    write_report(out, results, raw, np.asarray(f2["residual"]), raw_real)
    print(f"[study] done in {clock.total / 60:.1f} min; wrote {out}/report.md, results.json, figures/", flush=True)
    return results


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, atomically; numpy scalars, tensors and paths become plain values."""
    from lit_heads.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
