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


def cross_half_r2(target: dict[str, torch.Tensor], bases: dict[str, dict[str, torch.Tensor]]) -> float:
    """R² of the target's pattern on one half of its probe, fitted (least squares, no intercept) by the bases'
    patterns on the *other* half, averaged over the two ways round (A by B, B by A). Target and bases then
    share no probe sample, and both sides rest on half the samples, as in the noise ceiling."""
    from lit_heads.analysis.compose import fit_composition

    return 0.5 * sum(fit_composition(target[x], {n: b[y] for n, b in bases.items()}).r2 for x, y in (("a", "b"),
                                                                                                     ("b", "a")))


def composition(target: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]], components: list[str],
                controls: list[str]) -> dict[str, Any]:
    """Finding 2 on ΔAP: the main fit (lstsq and NNLS on the whole probe, as the paper), every component
    swapped for every control task, all basic tasks together; each fit also as `cross_half_r2`. The noise
    ceiling is `cross_half_r2` of the target by itself: how much of the target's pattern on one half of the
    probe its own pattern on the other half explains, i.e. the most any fit across halves can reach."""
    from lit_heads.analysis.compose import fit_composition

    def fits(names: list[str]) -> tuple[dict[str, Any], Any]:
        bases = {n: deltas[n]["full"] for n in names}
        whole = {m: fit_composition(target["full"], bases, method=m) for m in ("lstsq", "nnls")}
        out = {m: fit_dict(f) for m, f in whole.items()}
        out["cross_half_r2"] = cross_half_r2(target, {n: deltas[n] for n in names})
        return out, whole["lstsq"]

    main, main_lstsq = fits(components)
    out: dict[str, Any] = {"components": components, "main": main, "residual": main_lstsq.residual.tolist(),
                           "controls": {}}
    for control in controls:
        for swapped in components:
            names = [control if c == swapped else c for c in components]
            out["controls"][f"{'+'.join(names)} ({control} instead of {swapped})"] = fits(names)[0]
        out["controls"][f"{control} alone"] = fits([control])[0]
    all_basic = [n for n in deltas if n in components or n in controls]
    if len(all_basic) > len(components):
        out["all_basic"] = fits(all_basic)[0]
    out["noise_ceiling_r2"] = cross_half_r2(target, {"self": target})
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


def summary(values: list[float], ci: float | None = None) -> dict[str, Any]:
    """Mean, sample standard deviation and the values; with `ci` (e.g. 0.95) also the two-sided Student-t
    interval mean ± t_{(1+ci)/2, n-1} · std / √n, which needs n >= 2."""
    from scipy.stats import t

    array = np.asarray(values, dtype=float)
    n = len(array)
    out: dict[str, Any] = {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if n > 1 else 0.0,
                           "n": n, "values": list(map(float, values))}
    if ci is not None:
        if n < 2:
            raise ValueError(f"a {ci:.0%} t-interval needs at least 2 values, got {n}")
        half = float(t.ppf((1 + ci) / 2, n - 1) * out["std"] / math.sqrt(n))
        out.update(ci=ci, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    return out


def paired(a: list[float], b: list[float], ci: float | None = None) -> dict[str, Any]:
    """`summary` of the per-seed differences a_i - b_i (the same seed's runs of two arms)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return summary([x - y for x, y in zip(a, b)], ci)
