"""The full vs head-restricted vs LoRA comparison report: read each arm's run folder back, write a markdown
table and PNG plots.

An arm folder is what `lit_heads compare` gives every `lit_heads fit` run:

    fit_summary.json              val loss/accuracy before and after fit (FitSummary)
    arm_stats.json                loss curves, step times, peak memory, trained/optimizer-state
                                  sizes, LoRA options (lit_heads.commands.compare.ArmStats)
    heads/ap_history.safetensors  activation patterns over training (HeadActivationMonitor)
    heads/selection.json          the trained heads and exact counts (HeadRestrictedFinetuning only)

Plain files in, plain files out: no Lightning, so a notebook can call `load_arm` and the plots too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lit_heads.atomic import atomic_write, atomic_write_text
from lit_heads.errors import DataError
from lit_heads.heads.history import PatternHistory
from lit_heads.run_folder import FIT_SUMMARY, HEADS, NO_ACCURACY


@dataclass
class ArmResult:
    """The numbers of one arm, read back from its run folder."""

    name: str
    directory: Path
    trainable: int
    total: int
    optimizer_state: int  # scalars in optimizer state tensors (AdamW: exp_avg + exp_avg_sq)
    val_loss_before: float  # val/loss of the base model (FitSummary "before")
    val_loss: float  # after fit: val/loss, token-weighted over the whole validation set
    val_acc: float | None  # None: not measured, or no gradable answer (val_acc_n 0)
    val_acc_n: int | None
    step_time_s: float  # median over training steps
    peak_rss_mb: float
    peak_cuda_mb: float | None
    steps: int
    wall_s: float | None = None
    heads: list[tuple[int, int]] | None = None  # None for full SFT and LoRA
    lora: dict | None = None  # LoRA arms: r, alpha, dropout, modules (short names), n_modules
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    history: PatternHistory | None = None

    @property
    def ap_change(self) -> dict[str, float] | None:
        """corr / MSE of the final probe pattern against the step-0 pattern."""
        if self.history is None or len(self.history) < 2:
            return None
        s = self.history.statistics(len(self.history) - 1)
        return {"corr_vs_start": s["corr_vs_start"], "mse_vs_start": s["mse_vs_start"]}


def load_arm(directory: str | Path, name: str, wall_s: float | None = None) -> ArmResult:
    """Read an arm's run folder (see the module docstring)."""
    d = Path(directory)
    summary = _json(d / FIT_SUMMARY, "FitSummary")
    stats = _json(d / "arm_stats.json", "ArmStats")
    selection_file = d / HEADS / "selection.json"
    selection = json.loads(selection_file.read_text()) if selection_file.is_file() else None
    history_file = d / HEADS / "ap_history.safetensors"
    after = summary["after"]
    return ArmResult(
        name=name, directory=d, trainable=int(stats["trainable"]), total=int(stats["total"]),
        optimizer_state=int(stats["optimizer_state"]), val_loss_before=float(summary["before"]["val_loss"]),
        val_loss=float(after["val_loss"]), val_acc=after.get("val_acc"), val_acc_n=after.get("val_acc_n"),
        step_time_s=float(stats["step_time_median_s"]), peak_rss_mb=float(stats["peak_rss_mb"]),
        peak_cuda_mb=stats.get("peak_cuda_mb"), steps=int(summary["steps"]), wall_s=wall_s,
        heads=[tuple(h) for h in selection["heads"]] if selection else None, lora=stats.get("lora"),
        val_curve=[tuple(p) for p in stats["val_curve"]], train_curve=[tuple(p) for p in stats["train_curve"]],
        history=PatternHistory.load(history_file) if history_file.is_file() else None,
    )


def _json(path: Path, writer: str) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path} is missing, so this run cannot be reported. It is written by the {writer} callback at the end "
            "of `lit_heads fit`; check that the run finished (see fit.log next to it) and that its config keeps "
            f"{writer}."
        )
    return json.loads(path.read_text())


# ---- table ----------------------------------------------------------------------------------------
COLUMNS = ["arm", "trained heads", "trainable params", "% of model", "optimizer state", "final val loss",
           "final val acc", "step time (median)", "peak memory", "AP corr vs step 0", "AP MSE vs step 0"]


def table_rows(arms: list[ArmResult]) -> list[list[str]]:
    rows = []
    for a in arms:
        change = a.ap_change
        n_heads = a.history.scores[0].numel() if a.history is not None else None
        heads = "all" if a.heads is None else (f"{len(a.heads)} / {n_heads}" if n_heads else str(len(a.heads)))
        if a.lora is not None:
            heads = f"LoRA r={a.lora['r']} on {', '.join(a.lora['modules'])}"
        acc = format_accuracy(a)
        memory = f"{a.peak_rss_mb / 1024:.2f} GiB RSS" + (
            f", {a.peak_cuda_mb / 1024:.2f} GiB CUDA" if a.peak_cuda_mb else "")
        rows.append([
            a.name, heads, f"{a.trainable:,}", f"{100 * a.trainable / a.total:.3f}%", f"{a.optimizer_state:,}",
            f"{a.val_loss_before:.4f} → {a.val_loss:.4f}", acc, f"{a.step_time_s:.3f} s", memory,
            "-" if change is None else f"{change['corr_vs_start']:.4f}",
            "-" if change is None else f"{change['mse_vs_start']:.3e}",
        ])
    return rows


def format_accuracy(arm: ArmResult) -> str:
    if arm.val_acc_n is None:
        return "-"  # not measured
    return NO_ACCURACY if arm.val_acc is None else f"{arm.val_acc:.3f} (n={arm.val_acc_n})"


def markdown_table(arms: list[ArmResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(arms)]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------
def plot_losses(arms: list[ArmResult], path: str | Path) -> Path:
    """Training loss (left) and validation loss (right) against the optimizer step, one line per arm;
    the dashed line is the validation loss of the base model. The curve (`val/loss` of each
    validation, from ArmStats) and the base line (FitSummary's "before") are the same number: the
    module's token-weighted validation loss."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_train, ax_val = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for n, a in enumerate(arms):
        color = f"C{n}"
        if a.train_curve:
            ax_train.plot(*zip(*a.train_curve), color=color, alpha=0.85, label=a.name)
        if a.val_curve:
            ax_val.plot(*zip(*a.val_curve), color=color, marker="o", label=a.name)
    if arms:
        ax_val.axhline(arms[0].val_loss_before, color="gray", linestyle="--", label="base model")
    for ax, title in ((ax_train, "train loss"), (ax_val, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_ap_change(arms: list[ArmResult], path: str | Path) -> Path | None:
    """Top: correlation and MSE of each probe pattern with the arm's step-0 pattern. Bottom: per arm,
    the signed AP change (last probe minus step 0), trained heads marked with a dot."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with_history = [a for a in arms if a.history is not None and len(a.history) >= 2]
    if not with_history:
        return None
    cols = max(2, len(with_history))
    fig = Figure(figsize=(3.6 * cols, 7.5))
    grid = fig.add_gridspec(2, cols)
    ax_corr, ax_mse = fig.add_subplot(grid[0, : cols // 2]), fig.add_subplot(grid[0, cols // 2 :])
    for n, a in enumerate(arms):
        if a not in with_history:
            continue
        rows = [a.history.statistics(i) for i in range(len(a.history))]
        ax_corr.plot(a.history.steps, [r["corr_vs_start"] for r in rows], marker="o", color=f"C{n}", label=a.name)
        ax_mse.plot(a.history.steps, [r["mse_vs_start"] for r in rows], marker="o", color=f"C{n}", label=a.name)
    ax_corr.set_title("AP correlation with step 0")
    ax_mse.set_title("AP MSE vs step 0")
    for ax in (ax_corr, ax_mse):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    deltas = [a.history.scores[-1] - a.history.scores[0] for a in with_history]
    limit = max(float(d.abs().max()) for d in deltas) or 1.0  # one colour scale for every arm
    for n, (a, delta) in enumerate(zip(with_history, deltas)):
        ax = fig.add_subplot(grid[1, n])
        image = ax.imshow(delta.numpy(), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        if a.heads:
            ax.scatter([h for _, h in a.heads], [l for l, _ in a.heads], s=8, c="black", marker="o", label="trained")
        ax.set_title(f"{a.name}: AP step {a.history.steps[-1]} − step 0", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=fig.axes[-1], label="AP change")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


# ---- the report -----------------------------------------------------------------------------------
def write_report(arms: list[ArmResult], out_dir: str | Path, *, title: str | None = None,
                 command: str | None = None, notes: list[str] | None = None) -> Path:
    """Write `report.md`, `losses.png`, `ap_change.png` and `results.json` into `out_dir`."""
    out = Path(out_dir)
    title = title or "Full vs head-restricted SFT" + (" vs LoRA" if any(a.lora for a in arms) else "")
    losses = plot_losses(arms, out / "losses.png")
    ap = plot_ap_change(arms, out / "ap_change.png")
    steps = sorted({a.steps for a in arms})
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{len(arms)} arms from one config: same seed, data and step budget ({', '.join(map(str, steps))} optimizer "
        "steps).",
        "",
        markdown_table(arms),
        "",
        "- **trainable params**: the exact number of trained scalars (head deltas for restricted arms, the adapters' "
        "A and B matrices, r × (in + out) per adapted layer, for LoRA arms); **% of model**: of the base model's "
        "parameters; **optimizer state**: scalars in AdamW's state tensors (2 × trainable).",
        "- **final val loss**: `val/loss`, the response-token cross-entropy summed over the whole validation set "
        "and divided by its number of response tokens, before → after fit (FitSummary); the validation curve in "
        "the plot is the same number at each validation. **final val acc**: greedy exact match on the first n "
        f"validation prompts ({NO_ACCURACY}: no prompt had an answer to check).",
        "- **step time**: median wall time of a training step (forward, backward, optimizer); "
        "**peak memory**: peak resident memory of the training process (and peak CUDA memory on GPU).",
        "- **AP corr / MSE vs step 0**: the activation pattern on the monitor's probe set at the last probe step "
        "against step 0 (1.0 / 0 = unchanged).",
        "",
        f"![losses]({losses.name})",
    ]
    if ap is not None:
        lines += ["", f"![activation-pattern change]({ap.name})"]
    if any(a.wall_s for a in arms):
        lines += ["", "Wall time per arm (whole `lit_heads fit`, incl. loading and validation): "
                  + ", ".join(f"{a.name} {a.wall_s:.0f} s" for a in arms if a.wall_s) + "."]
    lines += ["", *(notes or [])]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    results = [
        {k: v for k, v in vars(a).items() if k not in ("history", "directory")} | {"directory": str(a.directory),
                                                                                   "ap_change": a.ap_change}
        for a in arms
    ]
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return report


__all__ = ["ArmResult", "load_arm", "markdown_table", "plot_ap_change", "plot_losses", "table_rows", "write_report"]
