"""The causal check of the study's head rankings (issue 13, item 4): `lit_heads ablate`'s logic
(`lit_heads.analysis.ablation`) on the complex task's fully fine-tuned model, for two rankings at once.

    AP     the fine-tuned model's activation pattern on the complex task's probe
    |ΔAP|  how much SFT changed each head's AP there (|after − before|), the ranking the application's
           regression and the head-restricted arm read

For every k of the schedule the top-k and the bottom-k heads of each ranking, and k random heads per seed
(shared by both rankings: a random choice does not depend on a ranking), are masked at the input of the
attention output projection, and the held-out loss of the complex task's causal-check samples (disjoint
from the probe and the graded samples) is measured. A ranking passes when its top-k hurt more than random-k.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lit_heads.analysis.study.tasks import Task

if TYPE_CHECKING:  # the report reads RANKINGS, and drawing it must not need Lightning
    from lit_heads.analysis.study.runner import StudyRunner

RANKINGS = {"ap": "AP after SFT", "abs_delta": "|ΔAP| (after − before SFT)"}
RANKED = ("top", "bottom")


def n_evaluations(ks: list[int], seeds: list[int]) -> int:
    """Loss evaluations of the causal check: the unmasked model, then per k the random heads of every seed
    and the top and bottom heads of every ranking."""
    return 1 + len(set(ks)) * (len(seeds) + len(RANKINGS) * len(RANKED))


def rankings(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two head scores the check tests, from the complex task's patterns before and after its SFT."""
    return {"ap": after["full"], "abs_delta": (after["full"] - before["full"]).abs()}


def causal_check(runner: StudyRunner, task: Task, scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mask the heads each ranking puts first and last, and random ones, on the model as it is now; per
    ranking: the unmasked loss, every masked evaluation and `ablation.summarize`'s table per k."""
    from lit_heads.analysis.ablation import Evaluator, plan_schedule, run_ablation, summarize
    from lit_heads.heads.ablation import head_output_means

    cfg = runner.cfg
    started = time.perf_counter()
    examples = task.causal
    evaluator = Evaluator(runner.module, runner.ap_data, examples)  # loss only: no generation
    means = None
    if cfg.ablate_mask == "mean":
        means = head_output_means(runner.module.model, runner.ap_data.make_dataloader(examples))
    shape = (runner.n_layers, runner.n_heads)
    plans = {"random": plan_schedule(None, *shape, cfg.ablate_k, ("random",), cfg.ablate_seeds)}
    plans.update({name: plan_schedule(s, *shape, cfg.ablate_k, RANKED) for name, s in scores.items()})
    schedule = [a for plan in plans.values() for a in plan]
    print(f"[study] causal check: {cfg.ablate_mask} ablation of k = {sorted(set(cfg.ablate_k))} heads by "
          f"{', '.join(RANKINGS[n] for n in scores)} and at random (seeds {list(cfg.ablate_seeds)}); "
          f"{len(schedule) + 1} losses on {len(examples)} held-out {task.name} samples", flush=True)
    run = run_ablation(evaluator, runner.module.model, schedule, mode=cfg.ablate_mask, means=means)
    rows = iter(run["rows"])
    by_plan = {name: [next(rows) for _ in plan] for name, plan in plans.items()}
    per_ranking = {}
    for name in scores:
        mine = by_plan["random"] + by_plan[name]
        per_ranking[name] = {"label": RANKINGS[name], "rows": mine, "summary": summarize(mine),
                             "passes": passes(summarize(mine))}
    return {"mask": cfg.ablate_mask, "k": sorted(set(cfg.ablate_k)), "seeds": list(cfg.ablate_seeds),
            "task": task.name, "n_samples": evaluator.n_samples, "n_tokens": evaluator.n_tokens,
            "base": run["base"], "rankings": per_ranking, "seconds": round(time.perf_counter() - started, 1)}


def passes(summary: list[dict]) -> dict[str, Any]:
    """Per k whether masking the top-k raised the loss more than masking random-k heads did on average,
    and more than on every random seed; `all` when it held (above the mean) at every k."""
    per_k = []
    for entry in summary:
        top, rand = entry["top"]["loss_increase"], entry["random"]["loss_increase"]
        per_k.append({"k": entry["k"], "top_minus_random": top["mean"] - rand["mean"],
                      "above_mean": top["mean"] > rand["mean"], "above_every_seed": top["mean"] > rand["max"]})
    return {"per_k": per_k, "all": all(v["above_mean"] for v in per_k)}
