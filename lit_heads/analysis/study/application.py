"""The paper's application: α → a mix of basic-task data, then the scarce complex data (two-stage SFT),
against complex-only SFT, a mix in random proportions and a mix weighted by the basic tasks' data sizes,
at the same step budget, over seeds.

The budget is matched: every trained arm takes mix_steps + complex_steps optimizer steps at batch_size.
Complex-only SFT spends all of them on the scarce complex samples; each mix arm spends mix_steps on
mix_steps · batch_size basic-task samples (one pass; `n_mix`) and then complex_steps on the *same* scarce
samples. Each stage starts a fresh AdamW with its own warmup and cosine decay. A seed fixes the scarce
sample set (drawn from the complex task's training part, the same for every arm of that seed), the
shuffles, the mixes' draws and the random mix's proportions; every arm is graded on the same held-out
complex samples, so arms of one seed are paired.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_heads.analysis.study.measures import paired, summary
from lit_heads.analysis.study.tasks import Task

if TYPE_CHECKING:  # the report imports ARMS, and drawing it must not need Lightning
    from lit_heads.analysis.study.runner import StudyRunner

ARMS = ("base", "complex_only", "random_mix", "size_mix", "ap_mix")
MIX_ARMS = ("random_mix", "size_mix", "ap_mix")
ARM_LABELS = {"base": "Base", "complex_only": "complex-only SFT", "random_mix": "random mix → complex",
              "size_mix": "size-weighted mix → complex", "ap_mix": "AP-guided mix → complex"}
# The paper's columns, in its order; the size-weighted mix is ours.
PAPER_ARMS = ("base", "complex_only", "random_mix", "ap_mix")


def mix_weights(arm: str, alpha: dict[str, float], sizes: dict[str, int], seed: int) -> dict[str, float]:
    """Task weights of a mix arm: α for the AP-guided mix; the training pool sizes for the size-weighted
    one; for the random one, proportions drawn uniformly from the simplex (a flat Dirichlet) per seed,
    so it is a mix nobody chose rather than the pool-size mix drawn with noise."""
    if arm == "ap_mix":
        return dict(alpha)
    if arm == "size_mix":
        return {t: float(n) for t, n in sizes.items()}
    if arm == "random_mix":
        rng = random.Random(f"random_mix:{seed}")
        draws = {t: rng.expovariate(1.0) for t in sizes}
        total = sum(draws.values())
        return {t: w / total for t, w in draws.items()}
    raise ValueError(f"not a mix arm: {arm!r}")


def application(runner: StudyRunner, tasks: dict[str, Task], alpha: dict[str, float], mix_dir: Path) -> dict[str, Any]:
    """Complex-only SFT and the three mix arms over seeds, graded on the complex task's held-out part."""
    from lit_heads.analysis.mix import build_mix, mix_counts, write_jsonl

    cfg = runner.cfg
    complex_task = tasks[cfg.complex_task]
    evaluation = complex_task.heldout[: cfg.eval_samples]
    pools = {t: tasks[t].train for t in cfg.basic_tasks}
    sizes = {t: len(pool) for t, pool in pools.items()}
    n = cfg.n_mix
    accuracies: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    counts: dict[str, list[dict[str, int]]] = {arm: [] for arm in MIX_ARMS}
    for seed in cfg.seeds:
        scarce = random.Random(f"scarce:{seed}").sample(complex_task.train, cfg.complex_train_size)
        mixes = {}
        for arm in MIX_ARMS:
            weights = mix_weights(arm, alpha, sizes, seed)
            mixes[arm] = build_mix(weights, pools, n, seed=seed, rule=cfg.mix_rule)
            counts[arm].append(mix_counts(weights, n, cfg.mix_rule))
            if seed == cfg.seeds[0]:
                write_jsonl(mixes[arm], mix_dir / f"{arm}.jsonl")
        for arm in ARMS[1:]:
            runner.reset()
            print(f"[study] application seed {seed}: {arm}", flush=True)
            if arm == "complex_only":
                runner.train(scarce, cfg.mix_steps + cfg.complex_steps, seed)
            else:
                runner.train(mixes[arm], cfg.mix_steps, seed)
                runner.train(scarce, cfg.complex_steps, seed)
            accuracies[arm].append(runner.accuracy(evaluation))
    return {
        "alpha": alpha, "rule": cfg.mix_rule, "n_mix": n, "pool_sizes": sizes, "mix_counts": counts,
        "complex_train_size": cfg.complex_train_size, "eval_samples": len(evaluation),
        "steps": {"mix": cfg.mix_steps, "complex": cfg.complex_steps,
                  "complex_only": cfg.mix_steps + cfg.complex_steps},
        "seeds": list(cfg.seeds), "ci": cfg.ci,
        "accuracy": {arm: summary(v, cfg.ci) for arm, v in accuracies.items()},
        "paired": {f"ap_mix - {other}": paired(accuracies["ap_mix"], accuracies[other], cfg.ci)
                   for other in ("random_mix", "size_mix", "complex_only")},
    }
