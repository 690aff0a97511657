"""The study's figures, drawn with `matplotlib.figure.Figure` (no pyplot), so the caller's backend and
global state are left alone, and written atomically like every other artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lit_heads.analysis.study.application import ARM_LABELS
from lit_heads.atomic import atomic_write


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path.name


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_patterns(raw: dict, names: list[str], path: Path) -> str:
    """One row per task: AP before SFT, after SFT, and the change (diverging colours around 0)."""
    fig = _figure(10, 2.6 * len(names))
    for row, name in enumerate(names):
        panels = [("before", raw["before"][name]["full"], "viridis"), ("after", raw["after"][name]["full"], "viridis"),
                  ("ΔAP = after − before", raw["delta"][name]["full"], "coolwarm")]
        for col, (title, data, cmap) in enumerate(panels):
            ax = fig.add_subplot(len(names), 3, 3 * row + col + 1)
            data = np.asarray(data)
            limits = {}
            if cmap == "coolwarm":
                bound = float(np.abs(data).max()) or 1.0
                limits = {"vmin": -bound, "vmax": bound}
            im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", **limits)
            ax.set_xticks(range(0, data.shape[1], max(1, data.shape[1] // 8)))
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_similarity(sims: dict, names: list[str], path: Path, which: str = "delta") -> str:
    """Correlation and top-k overlap matrices; the diagonal is the within-task (half vs half) value."""
    fig = _figure(10, 4.2)
    for col, metric in enumerate(("corr", "topk_jaccard")):
        matrix = np.asarray(sims[f"{which}_{metric}"]["matrix"], dtype=float)
        ax = fig.add_subplot(1, 2, col + 1)
        im = ax.imshow(matrix, cmap="magma", vmin=min(0.0, np.nanmin(matrix)), vmax=1.0)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if matrix[i, j] > 0.5 else "white")
        label = "Pearson r" if metric == "corr" else "top-k Jaccard"
        what = "ΔAP" if which == "delta" else "AP after SFT"
        ax.set_title(f"{what}: {label}\n(diagonal: half A vs half B of the same task)", fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_over_steps(over: dict, path: Path) -> str:
    fig = _figure(8, 3.2)
    panels = (("mse_vs_final", "MSE vs final pattern"), ("corr_vs_final", "correlation vs final pattern"))
    for col, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, col + 1)
        ax.plot(over["steps"], over[key], marker="o")
        ax.set_xlabel("SFT step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_application(app: dict, path: Path) -> str:
    """Mean accuracy per arm with its spread over seeds (the t-interval half-width when the study asked
    for one, else the standard deviation) and every seed's value as a dot."""
    arms = list(app["accuracy"])
    means = [100 * app["accuracy"][a]["mean"] for a in arms]
    spreads = [100 * app["accuracy"][a].get("half_width", app["accuracy"][a]["std"]) for a in arms]
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#999999", "#4c72b0", "#dd8452", "#8172b3", "#55a868"][: len(arms)]
    ax.bar(range(len(arms)), means, yerr=spreads, capsize=5, color=colors)
    for i, arm in enumerate(arms):
        values = app["accuracy"][arm]["values"]
        ax.scatter([i] * len(values), [100 * v for v in values], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(arms)), [ARM_LABELS.get(a, a).replace(" → ", "\n→ ") for a in arms], fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    spread = f"{100 * app['ci']:.0f}% t-interval" if app.get("ci") else "std"
    ax.set_title(f"complex task, mean ± {spread} over seeds {app['seeds']}", fontsize=9)
    return _save(fig, path)
