"""The study from config to report: plan and ETA, then each stage in turn on one loaded model, with
results.json rewritten after every stage and report.md drawn from it at the end. Several models run one
after the other into their own folders, and a side-by-side report compares them (or earlier runs)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_heads.analysis.study.application import application
from lit_heads.analysis.study.budget import Clock, describe_plan, plan_budget
from lit_heads.analysis.study.causal import causal_check, rankings
from lit_heads.analysis.study.config import REFERENCE_MATMUL_WEIGHTS, StudyConfig, model_shape, run_folder
from lit_heads.analysis.study.findings import finding1, finding3_restricted, full_sft_label
from lit_heads.analysis.study.measures import change_over_steps, composition, summary
from lit_heads.analysis.study.paper import PAPER
from lit_heads.analysis.study.report import write_report, write_side_by_side
from lit_heads.analysis.study.runner import StudyRunner
from lit_heads.analysis.study.tasks import REAL_COMPONENTS, check_fits, generated_tasks, real_tasks
from lit_heads.errors import ConfigError, DataError


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run everything and write report.md, results.json, figures/, patterns/ and mix/ under cfg.output;
    with several models, each under cfg.output/<model>/ and a side-by-side report.md in cfg.output;
    with `combine`, only the side-by-side report of the runs named."""
    cfg.validate()
    out = Path(cfg.output)
    if cfg.combine:
        runs = read_runs(cfg.combine)
        write_side_by_side(out, runs)
        print(f"[study] wrote {out}/report.md: {len(runs)} runs side by side", flush=True)
        return {"runs": runs}
    real = cfg.use_real()
    if real and "own" not in cfg.probes:
        raise ConfigError(f"probes={cfg.probes} lacks 'own', which the real tasks need (their control is a generated "
                          "task's pattern on its own samples); add 'own' to probes or set real_data: off.")
    models = cfg.models
    # Every model's shape and tokenizer are checked before the first one trains: a misspelt or misfitting second
    # model must fail now, not after the first model's hour.
    shapes = {m: model_shape(m) for m in models}
    for m, shape in shapes.items():
        if shape is not None:
            cfg.check_heads(m, shape["heads"])
    budgets = {m: plan_budget(replace(cfg, model=m), real, scale(shapes[m])) for m in models}
    for m in models:
        print(describe_plan(cfg, budgets[m], m), flush=True)
    if len(models) > 1:
        print(f"[study] {len(models)} models, estimated {sum(b['eta_s'] for b in budgets.values()) / 60:.1f} min "
              "in all", flush=True)
    tasks = generated_tasks(cfg)
    fits = {m: fit_lengths(cfg, m, tasks) for m in models}
    if len(models) == 1:
        return _run_one(replace(cfg, model=models[0]), out, real, budgets[models[0]], tasks, fits[models[0]])
    runs = {}
    for m in models:
        runs[m] = _run_one(replace(cfg, model=m), out / run_folder(m), real, budgets[m], tasks, fits[m])
    write_side_by_side(out, runs)
    print(f"[study] wrote {out}/report.md: {len(models)} models side by side", flush=True)
    return {"runs": runs}


def scale(shape: dict[str, int] | None) -> float:
    """The model's compute per token relative to the model the per-unit estimates were measured on."""
    return 1.0 if shape is None else shape["matmul_weights"] / REFERENCE_MATMUL_WEIGHTS


def fit_lengths(cfg: StudyConfig, model: str, tasks: dict) -> dict[str, int]:
    """max_length / max_new_tokens against the model's tokenizer (`tasks.check_fits`), before its weights load."""
    from lit_heads.data.collate import PromptEncoder
    from lit_heads.models import load_tokenizer

    return check_fits(cfg, tasks, PromptEncoder(load_tokenizer(model), cfg.max_length), model)


def read_runs(folders: list[str]) -> dict[str, dict]:
    """results.json of each finished run folder, keyed by its model (the folder when two share a model)."""
    runs: dict[str, dict] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise DataError(f"combine names {folder}, which has no results.json; give folders written by `lit_heads "
                            "study`.")
        results = json.loads(path.read_text())
        if not results.get("complete"):
            raise DataError(f"{path} is from a run that did not finish (complete: false); rerun that study or leave it "
                            "out.")
        name = results["model"]["name"]
        runs[folder if name in runs else name] = results
    return runs


def _run_one(cfg: StudyConfig, out: Path, real: bool, budget: dict, tasks: dict,
             lengths: dict) -> dict[str, Any]:
    for sub in ("figures", "patterns", "mix"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    clock = Clock(budget["eta_s"], budget["stages"])

    def done(stage: str) -> None:
        clock.lap(stage)
        # Partial results after every stage: a long run that dies late keeps what it measured.
        write_json(out / "results.json",
                   {**results, "seconds": {"total": clock.total, "stages": clock.stages}, "complete": False})

    runner = StudyRunner(cfg)
    complex_task = tasks[cfg.complex_task]
    results: dict[str, Any] = {"config": asdict(cfg), "paper": PAPER, "budget": budget, "real_data": real,
                               "model": {"name": cfg.model, "layers": runner.n_layers, "heads": runner.n_heads,
                                         "chat_template": runner.data.encoder.use_chat_template, "tokens": lengths}}

    runner.reset()
    base_accuracy = runner.accuracy(complex_task.heldout[: cfg.eval_samples])
    done("base")

    f1 = finding1(runner, tasks, cfg.sft_steps, cfg.ap_samples, track=cfg.complex_task, patterns_dir=out / "patterns",
                  probes=tuple(cfg.probes), complex_task=cfg.complex_task)
    raw = f1.pop("_raw")
    results["finding1"] = f1
    done("finding1")

    # Finding 2 once per probe mode; the first mode is the main one (the report's Finding 2, the mix's α).
    fits = {mode: composition(raw["probes"][mode]["delta"][cfg.complex_task], raw["probes"][mode]["delta"],
                              cfg.components, cfg.controls) for mode in cfg.probes}
    residual = np.asarray(fits[cfg.main_probe]["residual"])
    results["probes"] = {mode: {k: v for k, v in f.items() if k != "residual"} for mode, f in fits.items()}
    results["finding2"] = {"probe": cfg.main_probe, **results["probes"][cfg.main_probe]}
    np.save(out / "patterns" / "residual.npy", residual)
    done("finding2")

    # Finding 1 trains the complex task last, so its fully fine-tuned model is the one loaded now.
    if runner.state != full_sft_label(cfg.complex_task):
        raise RuntimeError(f"the causal check needs the model of {full_sft_label(cfg.complex_task)}, "
                           f"but the runner holds {runner.state!r}")
    results["ablation"] = causal_check(runner, complex_task, rankings(raw["before"][cfg.complex_task],
                                                                      raw["after"][cfg.complex_task]))
    done("ablation")

    f3: dict[str, Any] = {"over_steps": change_over_steps(raw["tracked"]) if raw["tracked"] is not None else None,
                          "full_sft_accuracy": f1.pop("full_sft_accuracy"), "base_accuracy": base_accuracy}
    f3["restricted"] = finding3_restricted(runner, tasks, raw["delta"][cfg.complex_task],
                                           raw["before"][cfg.complex_task])
    results["finding3"] = f3
    done("finding3")

    fit_for_mix = results["finding2"].get("all_basic", results["finding2"]["main"])[cfg.mix_method]
    app = application(runner, tasks, fit_for_mix["alpha"], out / "mix")
    app["accuracy"] = {"base": summary([base_accuracy]), **app["accuracy"]}
    app["alpha_fit"] = {"method": cfg.mix_method, "probe": cfg.main_probe, "bases": list(fit_for_mix["alpha"]),
                        "r2": fit_for_mix["r2"]}
    results["application"] = app
    done("application")

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
        # Control: a generated basic task not part of the composite (the real set has no third task); its
        # pattern is on its own samples, so the real tasks use the 'own' probe.
        own = raw["probes"]["own"]["delta"]
        deltas = {**raw_real["delta"], **{c: own[c] for c in cfg.controls}}
        rf2 = composition(raw_real["delta"]["gsm8k_python"], deltas, list(REAL_COMPONENTS), cfg.controls)
        np.save(out / "patterns" / "residual_real.npy", np.asarray(rf2["residual"]))
        results["real"] = {"finding1": rf1, "finding2": {k: v for k, v in rf2.items() if k != "residual"},
                           "sizes": {n: {"train": len(t.train), "heldout": len(t.heldout)} for n, t in rtasks.items()}}
        done("real")

    results["seconds"] = {"total": clock.total, "stages": clock.stages}
    results["complete"] = True
    # Numbers first: a failure while drawing must not lose an hour of results.
    write_json(out / "results.json", results)
    write_report(out, results, raw, residual, raw_real)
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
