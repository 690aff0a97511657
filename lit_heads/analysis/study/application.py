"""The paper's application: α → a mix of basic-task data, then the scarce complex data (two-stage SFT),
against complex-only SFT and a random mix of the same size, at the same step budget, over seeds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_heads.analysis.study.measures import mean_std
from lit_heads.analysis.study.tasks import Task

if TYPE_CHECKING:  # the report imports ARMS, and drawing it must not need Lightning
    from lit_heads.analysis.study.runner import StudyRunner

ARMS = ("base", "complex_only", "random_mix", "ap_mix")
ARM_LABELS = {"base": "Base", "complex_only": "complex-only SFT", "random_mix": "random mix → complex",
              "ap_mix": "AP-guided mix → complex"}


def application(runner: StudyRunner, tasks: dict[str, Task], alpha: dict[str, float], mix_dir: Path) -> dict[str, Any]:
    """Two-stage SFT over seeds: complex-only (all steps on the complex data), random mix then complex,
    AP-guided mix then complex; the same total steps for every arm, graded on the complex held-out part."""
    from lit_heads.analysis.mix import build_mix, mix_counts, write_jsonl

    cfg = runner.cfg
    complex_task = tasks[cfg.complex_task]
    scarce = complex_task.train[: cfg.complex_train_size]
    evaluation = complex_task.heldout[: cfg.eval_samples]
    pools = {t: tasks[t].train for t in cfg.basic_tasks}
    union = [e for t in cfg.basic_tasks for e in pools[t]]
    n = cfg.n_mix
    accuracies: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    random_counts = []
    for seed in cfg.seeds:
        guided = build_mix(alpha, pools, n, seed=seed, rule=cfg.mix_rule)
        # The random mix draws uniformly from all basic-task data, so its task shares are whatever chance gives.
        mixed = random.Random(seed).sample(union, n)
        random_counts.append({t: sum(e.task == t for e in mixed) for t in cfg.basic_tasks})
        if seed == cfg.seeds[0]:
            write_jsonl(guided, mix_dir / "ap_mix.jsonl")
            write_jsonl(mixed, mix_dir / "random_mix.jsonl")
        for arm in ARMS[1:]:
            runner.reset()
            print(f"[study] application seed {seed}: {arm}", flush=True)
            if arm == "complex_only":
                runner.train(scarce, cfg.mix_steps + cfg.complex_steps, seed)
            else:
                runner.train(guided if arm == "ap_mix" else mixed, cfg.mix_steps, seed)
                runner.train(scarce, cfg.complex_steps, seed)
            accuracies[arm].append(runner.accuracy(evaluation))
    return {
        "alpha": alpha, "rule": cfg.mix_rule, "n_mix": n, "ap_mix_counts": mix_counts(alpha, n, cfg.mix_rule),
        "random_mix_counts": random_counts, "complex_train_size": len(scarce), "eval_samples": len(evaluation),
        "steps": {"mix": cfg.mix_steps, "complex": cfg.complex_steps,
                  "complex_only": cfg.mix_steps + cfg.complex_steps},
        "seeds": list(cfg.seeds), "accuracy": {arm: mean_std(v) for arm, v in accuracies.items()},
    }
