"""Statistics of activation patterns (the paper's Gini / CV / MSE / correlation, plus a few more).

Every function takes a torch tensor, a numpy array or a `Pattern`, treats it as a flat vector of
head scores (except `rank_heads`, which needs the [layers, heads] shape) and returns plain Python
numbers, so results go straight into logs and JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lit_heads.errors import ConfigError

__all__ = [
    "coefficient_of_variation",
    "entropy",
    "gini",
    "mse",
    "pearson",
    "rank_heads",
    "spearman",
    "summary",
    "topk_jaccard",
]


def _array(x: Any, *, flat: bool = True) -> np.ndarray:
    from lit_heads.heads.pattern import Pattern

    if isinstance(x, Pattern):
        x = x.scores
    if hasattr(x, "detach"):  # torch tensor, any device/dtype
        x = x.detach().to("cpu").double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ConfigError("Pattern statistics need at least one head score; got an empty array.")
    if not np.all(np.isfinite(a)):
        raise ConfigError(
            "Pattern contains NaN or infinite scores (a layer that received no gradient?); recompute it before "
            "taking statistics."
        )
    return a.ravel() if flat else a


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(a, flat=False), _array(b, flat=False)
    if x.shape != y.shape:
        raise ConfigError(
            f"Cannot compare patterns of shapes {x.shape} and {y.shape}: they come from different models. Compare "
            f"patterns of the same model (same layers x heads)."
        )
    return x.ravel(), y.ravel()


def gini(pattern: Any) -> float:
    """Gini coefficient of the (non-negative) head scores: 0 = all heads equal, (n-1)/n = one head
    carries everything. An all-zero pattern gives 0."""
    x = np.sort(_array(pattern))
    if x[0] < 0:
        raise ConfigError("Gini coefficient needs non-negative scores (AP values are |.|); got negative entries.")
    n, total = x.size, x.sum()
    if total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * total) - (n + 1) / n)


def coefficient_of_variation(pattern: Any) -> float:
    """Population standard deviation / mean (ddof=0). NaN when the mean is 0."""
    x = _array(pattern)
    mean = x.mean()
    return float(x.std() / mean) if mean != 0 else math.nan


def entropy(pattern: Any, *, normalized: bool = False) -> float:
    """Shannon entropy (nats) of the pattern normalised to sum 1; with `normalized`, divided by
    log(n) so 1 means uniform. An all-zero pattern gives NaN."""
    x = _array(pattern)
    if np.any(x < 0):
        raise ConfigError("Entropy of a pattern needs non-negative scores; got negative entries.")
    total = x.sum()
    if total == 0:
        return math.nan
    p = x[x > 0] / total
    h = float(-(p * np.log(p)).sum())
    if normalized:
        return h / math.log(x.size) if x.size > 1 else 0.0
    return h


def mse(a: Any, b: Any) -> float:
    x, y = _pair(a, b)
    return float(np.mean((x - y) ** 2))


def pearson(a: Any, b: Any) -> float:
    from scipy import stats

    x, y = _pair(a, b)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.pearsonr(x, y)[0])


def spearman(a: Any, b: Any) -> float:
    from scipy import stats

    x, y = _pair(a, b)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y)[0])


def rank_heads(pattern: Any) -> list[tuple[int, int]]:
    """All (layer, head) pairs by descending score; ties in (layer, head) order, so rankings are
    deterministic."""
    a = _array(pattern, flat=False)
    if a.ndim != 2:
        raise ConfigError(f"rank_heads needs a [layers, heads] pattern; got shape {a.shape}.")
    n_heads = a.shape[1]
    # Stable sort of the negated scores keeps ties in flat (layer, head) order.
    order = np.argsort(-a.ravel(), kind="stable")
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def _topk_set(a: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-a, kind="stable")[:k].tolist())


def topk_jaccard(a: Any, b: Any, k: int) -> float:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the top-k heads of two patterns (ties broken as in
    `rank_heads`)."""
    x, y = _pair(a, b)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= x.size:
        raise ConfigError(f"topk_jaccard k={k!r}: choose an integer between 1 and the number of heads ({x.size}).")
    sa, sb = _topk_set(x, int(k)), _topk_set(y, int(k))
    return len(sa & sb) / len(sa | sb)


def summary(pattern: Any, *, top: int = 5) -> dict[str, Any]:
    """A JSON-ready summary: shape, moments, concentration statistics and the top heads."""
    a = _array(pattern, flat=False)
    x = a.ravel()
    out: dict[str, Any] = {
        "shape": list(a.shape),
        "n_heads_total": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "sum": float(x.sum()),
    }
    if x.min() >= 0:
        out["gini"] = gini(x)
        out["entropy"] = entropy(x)
        out["entropy_normalized"] = entropy(x, normalized=True)
    out["cv"] = coefficient_of_variation(x)
    if a.ndim == 2:
        ranked = rank_heads(a)[:top]
        out["top_heads"] = [[l, h, float(a[l, h])] for l, h in ranked]
        out["layer_mean"] = [float(v) for v in a.mean(axis=1)]
    return out
