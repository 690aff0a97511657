"""The study's numbers computed from patterns alone (no model, no training): similarity against the
half-split noise floor, composition fits with their controls, change over steps, concentration, and
the spread over seeds.

A pattern comes as two disjoint halves 'a' and 'b' of the held-out samples and their mean 'full'.
Every between-task similarity is taken half against half as well (A of task i with B of task j), so
the diagonal (A_i vs B_i) and the off-diagonal entries rest on exactly the same amount of data: an
off-diagonal value near the diagonal means "not task-specific", one well below it means
"task-specific beyond sampling noise".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def similarity(halves: dict[str, dict[str, torch.Tensor]], metric) -> list[list[float]]:
    """M[i][j] = metric(half A of task i, half B of task j), averaged with (B_i, A_j) off the diagonal;
    the diagonal metric(A_i, B_i) is the within-task agreement at the same sample size."""
    names = list(halves)
    matrix = []
    for i in names:
        row = []
        for j in names:
            if i == j:
                row.append(metric(halves[i]["a"], halves[i]["b"]))
            else:
                row.append(0.5 * (metric(halves[i]["a"], halves[j]["b"]) + metric(halves[i]["b"], halves[j]["a"])))
        matrix.append(row)
    return matrix


def specificity(matrix: list[list[float]], names: list[str]) -> dict[str, Any]:
    """Within-task (diagonal) against between-task (off-diagonal) similarity, per task and overall."""
    m = np.asarray(matrix, dtype=float)
    off = ~np.eye(len(names), dtype=bool)
    per_task = {n: {"within": float(m[i, i]),
                    "between_mean": float(np.mean(m[i][off[i]])) if len(names) > 1 else math.nan}
                for i, n in enumerate(names)}
    return {"within_mean": float(np.mean(np.diag(m))),
            "between_mean": float(np.mean(m[off])) if len(names) > 1 else math.nan, "per_task": per_task}


def delta_halves(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] - before[k] for k in ("a", "b", "full")}


def fit_dict(fit) -> dict[str, Any]:
    return {"alpha": fit.alpha, "r2": fit.r2, "method": fit.method}


def composition(target: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]], components: list[str],
                controls: list[str]) -> dict[str, Any]:
    """Finding 2 on ΔAP: the main fit (lstsq and NNLS), every component swapped for every control task,
    all basic tasks together, and the noise ceiling (half A of the target fitted by its half B)."""
    from lit_heads.analysis.compose import fit_composition

    def fits(names: list[str]) -> dict[str, Any]:
        bases = {n: deltas[n]["full"] for n in names}
        return {m: fit_composition(target["full"], bases, method=m) for m in ("lstsq", "nnls")}

    main = fits(components)
    out: dict[str, Any] = {"components": components, "main": {m: fit_dict(f) for m, f in main.items()},
                           "residual": main["lstsq"].residual.tolist(), "controls": {}}
    for control in controls:
        for swapped in components:
            names = [control if c == swapped else c for c in components]
            out["controls"][f"{'+'.join(names)} ({control} instead of {swapped})"] = {
                m: fit_dict(f) for m, f in fits(names).items()}
        out["controls"][f"{control} alone"] = {m: fit_dict(f) for m, f in fits([control]).items()}
    all_basic = [n for n in deltas if n in components or n in controls]
    if len(all_basic) > len(components):
        out["all_basic"] = {m: fit_dict(f) for m, f in fits(all_basic).items()}
    out["noise_ceiling_r2"] = fit_composition(target["a"], {"half_b": target["b"]}).r2
    return out


def change_over_steps(history) -> dict[str, list]:
    """MSE and correlation of every tracked pattern against the final one."""
    from lit_heads.heads import stats

    final = history.scores[-1]
    return {"steps": list(history.steps),
            "mse_vs_final": [stats.mse(s, final) for s in history.scores],
            "corr_vs_final": [stats.pearson(s, final) for s in history.scores]}


def concentration(pattern: torch.Tensor) -> dict[str, float]:
    from lit_heads.heads import stats

    return {"gini": stats.gini(pattern), "cv": stats.coefficient_of_variation(pattern)}


def mean_std(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": list(map(float, values))}
