"""Composition regression: is a complex task's head pattern a mix of basic tasks' patterns?

Finding 2 of Zhao et al. (arXiv 2409.15820): the activation pattern (AP, an L×H tensor) of a complex
task is close to a linear combination of the patterns of the basic tasks it is made of, e.g.
AP(math-with-code) ≈ α_math · AP(math) + α_code · AP(code), with R² 0.97. The paper's application
fits the same regression on pattern *changes* (after SFT minus before) and turns the weights α into a
data mix (see `lit_heads.analysis.mix`). Pass whichever you want to regress - raw patterns or their
changes - as `target` and `bases`; the arithmetic is the same.

Controls: a high R² only means something next to a low one. Fit the same target with a basis that is
*not* a component of the task (e.g. AP of an unrelated task, or a shuffled pattern) and compare the
two `CompositionFit.r2` values; no separate function is needed for that.

Everything here is plain numpy/scipy; no Lightning, no model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Mapping, Union

import numpy as np
import torch
from scipy.optimize import nnls

from lit_heads.errors import ConfigError, DataError

PatternLike = Union[torch.Tensor, np.ndarray]
METHODS = ("lstsq", "nnls")


@dataclass(frozen=True)
class CompositionFit:
    """Result of `fit_composition`.

    alpha:     weight of each basis pattern, in the order the bases were given.
    r2:        1 - SS_res / SS_tot over all L×H entries (the paper's R²). Without an intercept it can
               be negative when the bases explain the target worse than its mean does.
    residual:  target - fitted, shape [L, H], float64 numpy array.
    method:    "lstsq" (unconstrained) or "nnls" (α ≥ 0).
    intercept: constant added to every entry; 0.0 unless the fit was asked for one.
    """

    alpha: dict[str, float]
    r2: float
    residual: np.ndarray
    method: str
    intercept: float = 0.0


def _as_array(pattern: PatternLike, name: str) -> np.ndarray:
    if isinstance(pattern, torch.Tensor):
        array = pattern.detach().to("cpu", torch.float64).numpy()
    elif isinstance(pattern, np.ndarray):
        array = pattern.astype(np.float64, copy=False)
    else:
        raise ConfigError(
            f"Pattern {name!r} is a {type(pattern).__name__}; fit_composition needs a torch.Tensor or "
            f"numpy array of shape [layers, heads], e.g. the AP tensor saved by the head scorer."
        )
    if array.ndim != 2:
        raise ConfigError(
            f"Pattern {name!r} has shape {tuple(array.shape)}, but an activation pattern is 2-D "
            f"[layers, heads]. If it holds per-sample scores, average over the sample axis first."
        )
    if not np.isfinite(array).all():
        raise DataError(
            f"Pattern {name!r} contains NaN or infinite entries; recompute it (a NaN loss or an "
            f"empty batch usually causes this) before fitting a composition."
        )
    return array


def fit_composition(
    target: PatternLike,
    bases: Mapping[str, PatternLike],
    method: Literal["lstsq", "nnls"] = "lstsq",
    intercept: bool = False,
) -> CompositionFit:
    """Regress `target` [L, H] on the basis patterns `bases` ({name: [L, H]}) over all entries.

    method "lstsq" is ordinary least squares (α may be negative); "nnls" constrains α ≥ 0, which is
    what a data mix can use. With `intercept=True` a free constant (never constrained) is fitted too.
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown composition method {method!r}; use one of {', '.join(METHODS)}.")
    if len(bases) < 1:
        raise ConfigError(
            "fit_composition got no basis patterns; pass at least one, e.g. "
            "bases={'math': ap_math, 'code': ap_code}."
        )
    y_2d = _as_array(target, "target")
    names = list(bases)
    columns = []
    for name in names:
        basis = _as_array(bases[name], name)
        if basis.shape != y_2d.shape:
            raise ConfigError(
                f"Basis pattern {name!r} has shape {tuple(basis.shape)} but the target has "
                f"{tuple(y_2d.shape)}; all patterns must come from the same model (same layers × heads)."
            )
        columns.append(basis.ravel())

    y = y_2d.ravel()
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    # A constant target has no variance to explain, so R² is undefined (0/0); refuse rather than
    # report a meaningless number. Relative to the target's scale because AP values are often tiny,
    # and a constant float array can still show rounding-level spread around its mean.
    if ss_tot <= 1e-20 * float(np.sum(y**2)):
        raise DataError(
            "The target pattern is constant (zero variance across heads), so R² is undefined. "
            "Check that it was computed after training on the task (not all zeros) and that you "
            "passed the pattern, not a summary statistic."
        )
    x = np.stack(columns, axis=1)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        warnings.warn(
            f"The basis patterns {names} are linearly dependent (e.g. one is a multiple of another), "
            f"so the weights α are not unique; drop the redundant basis to get interpretable weights.",
            stacklevel=2,
        )

    # An unconstrained intercept is the same as fitting centred data; this keeps NNLS from
    # constraining the intercept to be non-negative as it would if it were one more column.
    if intercept:
        x_mean, y_mean = x.mean(axis=0), y.mean()
        x_fit, y_fit = x - x_mean, y - y_mean
    else:
        x_fit, y_fit = x, y

    if method == "lstsq":
        weights = np.linalg.lstsq(x_fit, y_fit, rcond=None)[0]
    else:
        weights = nnls(x_fit, y_fit)[0]

    offset = float(y_mean - x_mean @ weights) if intercept else 0.0
    fitted = x @ weights + offset
    residual = y - fitted
    r2 = 1.0 - float(np.sum(residual**2)) / ss_tot
    return CompositionFit(
        alpha={name: float(w) for name, w in zip(names, weights)},
        r2=r2,
        residual=residual.reshape(y_2d.shape),
        method=method,
        intercept=offset,
    )
