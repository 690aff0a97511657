"""The causal check of a head ranking: mask the top-k heads, k random heads (several seeds) and the
bottom-k heads, for a schedule of k, and measure how much the held-out loss rises and the greedy
accuracy falls. An importance score passes when masking its top heads hurts more than masking
random ones.

    schedule = plan_schedule(scores, n_layers, n_heads, ks=[1, 3, 9, 27], seeds=[0, 1, 2])
    evaluator = Evaluator(module, datamodule, examples, num_generate=32)
    results = run_ablation(evaluator, schedule, mode="mean", means=head_output_means(...))
    write_report(results, "out/ablate")

The masking itself is `lit_heads.heads.ablation.HeadMask`; the loss is the module's response loss,
token-weighted over the whole held-out set; accuracy is the share of greedy answers the task's
checker accepts (`lit_heads.data.is_correct`), generated with `SFTModule.generate`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit_heads.atomic import atomic_write, atomic_write_text
from lit_heads.errors import ConfigError, DataError
from lit_heads.heads.lm_loss import labelled

SELECTIONS = ("top", "random", "bottom")
CSV_COLUMNS = ("selection", "seed", "k", "loss", "loss_increase", "accuracy", "accuracy_drop", "seconds", "heads")
REPORT_FILES = ("report.md", "results.json", "results.csv", "ablation.png")


@dataclass(frozen=True)
class Ablation:
    """One masked evaluation: `k` heads chosen by `selection` (with `seed` for random)."""

    selection: str
    k: int
    heads: tuple[tuple[int, int], ...]
    seed: int | None = None


# ------------------------------------------------------------------------------------------------ schedule


def check_schedule(
    ks: Sequence[int], n_total: int | None, selections: Sequence[str], seeds: Sequence[int]
) -> list[int]:
    """Validate the schedule against a model with `n_total` heads (None: not known yet, the upper
    bound of k is not checked); returns the k values sorted and unique."""
    unknown = [s for s in selections if s not in SELECTIONS]
    if unknown or not selections:
        raise ConfigError(
            f"--selections {list(selections)}: use one or more of {', '.join(SELECTIONS)} (top-k by the scores, "
            f"k random heads per seed, bottom-k by the scores)."
        )
    if len(set(selections)) != len(selections):
        raise ConfigError(f"--selections {list(selections)} repeats a selection; give each once.")
    if "random" in selections and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(
            f"--seeds {list(seeds)}: the random selection needs one or more distinct seeds, e.g. [0, 1, 2]."
        )
    if not ks:
        raise ConfigError("--k is empty; give the numbers of heads to mask, e.g. --k 1 3 9 27.")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ConfigError(f"--k {list(ks)}: every k must be a whole number of heads >= 1 (got {bad}).")
    too_big = [k for k in ks if n_total is not None and k > n_total]
    if too_big:
        raise ConfigError(
            f"--k {list(ks)}: k = {max(too_big)} is larger than the number of heads of this model ({n_total}); "
            f"every k must be from 1 to {n_total}."
        )
    return sorted(set(ks))


def plan_schedule(
    scores: torch.Tensor | None,
    n_layers: int,
    n_heads: int,
    ks: Sequence[int],
    selections: Sequence[str] = SELECTIONS,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[Ablation]:
    """Every ablation of the run, by `lit_heads.heads.selection.select_heads` (top/bottom: stable
    ranking of `scores`, ties in head order; random: a seeded sample, so the k heads of one seed
    are the first k of one permutation and grow with k)."""
    from lit_heads.heads.selection import select_heads

    ks = check_schedule(ks, n_layers * n_heads, selections, seeds)
    plan = []
    for selection in selections:
        for seed in seeds if selection == "random" else [None]:
            for k in ks:
                heads = select_heads(selection, n_layers, n_heads, top_k=k, scores=scores, seed=seed or 0)
                plan.append(Ablation(selection, k, tuple(heads), seed))
    return plan


# ------------------------------------------------------------------------------------------------ evaluation


def response_token_count(labels: torch.Tensor) -> int:
    """Response tokens a causal LM is scored on in a batch (the label at position 0 is never predicted)."""
    return int(labelled(labels).sum())


def gradable(examples: list, num_generate: int) -> list:
    """The examples among the first `num_generate` that a checker can grade; an error when there
    are none although accuracy was asked for."""
    from lit_heads.data import is_checkable

    graded = [e for e in examples[:num_generate] if is_checkable(e)]
    if num_generate > 0 and not graded:
        raise ConfigError(
            f"--num_generate {num_generate}, but none of the first {num_generate} examples has an answer a checker can "
            f"grade. Use data with answers (a generated task, GSM8K, or records with an 'answer' field), or set "
            f"--num_generate 0 to report the loss alone."
        )
    return graded


class Evaluator:
    """Held-out loss and greedy accuracy of `module` (an `SFTModule`) on fixed examples.

    The batches are encoded once; the first `num_generate` examples that a checker can grade are
    answered greedily (0: no accuracy)."""

    def __init__(self, module, datamodule, examples: list, num_generate: int = 0, generate_batch_size: int = 16):
        if not examples:
            raise DataError("The ablation got no held-out examples; check --data and --n_samples.")
        self.module = module
        self.batches = list(datamodule.make_dataloader(examples))
        self.n_samples = len(examples)
        self.n_tokens = sum(response_token_count(b["labels"]) for b in self.batches)
        if self.n_tokens == 0:
            raise DataError(
                "The held-out examples have no response tokens, so their loss is undefined; check --max_length."
            )
        self.graded = gradable(examples, num_generate)
        self.prompts = [datamodule.render_prompt_ids(e) for e in self.graded]
        self.generate_batch_size = generate_batch_size

    def loss(self) -> float:
        """The project's one held-out loss (`SFTModule.evaluate_loss`): token-weighted over the whole set."""
        return self.module.evaluate_loss(self.batches)

    def accuracy(self) -> float | None:
        from lit_heads.data import is_correct

        if not self.graded:
            return None
        answers = self.module.generate(self.prompts, batch_size=self.generate_batch_size)
        return sum(is_correct(e, a) for e, a in zip(self.graded, answers, strict=True)) / len(self.graded)

    def __call__(self) -> dict[str, float | None]:
        return {"loss": self.loss(), "accuracy": self.accuracy()}


def run_ablation(
    evaluate: Callable[[], dict],
    model,
    schedule: list[Ablation],
    *,
    mode: str = "zero",
    means: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = print,
    on_row: Callable[[dict, list[dict]], None] | None = None,
) -> dict[str, Any]:
    """The unmasked baseline, then every ablation of `schedule` under `HeadMask`.

    evaluate: returns {"loss": float, "accuracy": float | None} for the model as it is now.
    on_row(base, rows): called after every evaluation (e.g. to save partial results).
    Returns {"base", "rows", "summary"}; a row's loss_increase is its loss minus the base loss and
    its accuracy_drop the base accuracy minus its accuracy.
    """
    from lit_heads.heads import find_heads
    from lit_heads.heads.ablation import HeadMask

    layout = find_heads(model)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    base = evaluate()
    base["seconds"] = round(time.perf_counter() - started, 3)
    eta = base["seconds"] * len(schedule)
    say(
        f"[ablate] base: loss {base['loss']:.4f}{_acc_text(base['accuracy'])} ({base['seconds']:.1f} s); "
        f"{len(schedule)} masked evaluations to go, about {_duration(eta)}"
    )
    rows: list[dict] = []
    for i, ablation in enumerate(schedule, 1):
        t0 = time.perf_counter()
        with HeadMask(model, ablation.heads, mode=mode, means=means, layout=layout):
            measured = evaluate()
        row = {
            "selection": ablation.selection,
            "seed": ablation.seed,
            "k": ablation.k,
            "loss": measured["loss"],
            "loss_increase": measured["loss"] - base["loss"],
            "accuracy": measured["accuracy"],
            "accuracy_drop": None if measured["accuracy"] is None else base["accuracy"] - measured["accuracy"],
            "seconds": round(time.perf_counter() - t0, 3),
            "heads": [list(h) for h in ablation.heads],
        }
        rows.append(row)
        name = ablation.selection + ("" if ablation.seed is None else f" seed {ablation.seed}")
        elapsed = time.perf_counter() - started
        left = elapsed / (i + 1) * (len(schedule) - i)
        say(
            f"[ablate] {i}/{len(schedule)} {name} k={ablation.k}: loss {row['loss']:.4f} ({row['loss_increase']:+.4f})"
            f"{_acc_text(row['accuracy'], row['accuracy_drop'])}; {_duration(elapsed)} elapsed, ~{_duration(left)} left"
        )
        if on_row is not None:
            on_row(base, rows)
    return {"base": base, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict[str, Any]]:
    """Per k: each selection's loss increase and accuracy drop; random as mean, min and max over seeds."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        entry: dict[str, Any] = {"k": k}
        for selection in SELECTIONS:
            found = [r for r in rows if r["k"] == k and r["selection"] == selection]
            if not found:
                continue
            entry[selection] = {
                metric: _spread([r[metric] for r in found]) for metric in ("loss_increase", "accuracy_drop")
            }
        out.append(entry)
    return out


def _spread(values: list[float | None]) -> dict[str, Any] | None:
    if any(v is None for v in values):
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def _acc_text(accuracy: float | None, drop: float | None = None) -> str:
    if accuracy is None:
        return ""
    return f", accuracy {accuracy:.3f}" + ("" if drop is None else f" ({-drop:+.3f})")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------ report


def markdown_table(results: dict[str, Any]) -> str:
    """One row per k: the loss increase and (when measured) the accuracy drop of every selection;
    random as "mean [min, max]" over its seeds."""
    summary = results["summary"]
    selections = [s for s in SELECTIONS if any(s in e for e in summary)]
    metrics = ["loss_increase"] + (["accuracy_drop"] if results["base"].get("accuracy") is not None else [])
    label = {"loss_increase": "loss increase", "accuracy_drop": "accuracy drop"}
    header = ["k"] + [f"{s} {label[m]}" for m in metrics for s in selections]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        cells = [str(entry["k"])]
        for metric in metrics:
            for selection in selections:
                spread = (entry.get(selection) or {}).get(metric)
                cells.append(_cell(spread))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(spread: dict | None) -> str:
    if spread is None:
        return "—"
    if spread["n"] == 1:
        return f"{spread['mean']:+.4f}"
    return f"{spread['mean']:+.4f} [{spread['min']:+.4f}, {spread['max']:+.4f}]"


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {**{c: row[c] for c in CSV_COLUMNS if c != "heads"}, "heads": " ".join(f"{l}:{h}" for l, h in row["heads"])}
        )
    return buffer.getvalue()


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Loss increase against k (and accuracy drop, when measured): one line per selection, random
    as the mean over seeds with its min–max band."""
    from matplotlib.figure import Figure

    summary = results["summary"]
    metrics = ["loss_increase"] + (["accuracy_drop"] if results["base"].get("accuracy") is not None else [])
    titles = {"loss_increase": "held-out loss increase", "accuracy_drop": "accuracy drop (greedy)"}
    colors = {"top": "C3", "random": "C7", "bottom": "C0"}
    fig = Figure(figsize=(5.2 * len(metrics), 4))
    ks = [e["k"] for e in summary]
    for col, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), col + 1)
        for selection in SELECTIONS:
            points = [(e["k"], e[selection][metric]) for e in summary if e.get(selection) and e[selection][metric]]
            if not points:
                continue
            x = [k for k, _ in points]
            mean = [s["mean"] for _, s in points]
            n = points[0][1]["n"]
            label = selection if n == 1 else f"{selection} (mean of {n} seeds, min–max band)"
            ax.plot(x, mean, marker="o", color=colors[selection], label=label)
            if n > 1:
                ax.fill_between(
                    x, [s["min"] for _, s in points], [s["max"] for _, s in points], color=colors[selection], alpha=0.25
                )
        if len(ks) > 1 and ks[-1] / ks[0] >= 4:
            ax.set_xscale("log")
            ax.set_xticks([], minor=True)  # only the k of the schedule are labelled
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("k (heads masked)")
        ax.set_title(titles[metric], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{results.get('mask', 'zero')} ablation · scores: {results.get('scores', {}).get('name', '?')}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


def report_markdown(results: dict[str, Any]) -> str:
    base, info = results["base"], results.get("config", {})
    scores = results.get("scores", {})
    lines = [
        "# Head ablation",
        "",
        f"Model `{results['model']['name']}` "
        f"({results['model']['n_layers']} layers x {results['model']['n_heads']} heads), "
        f"held-out data `{info.get('data')}` ({results['n_samples']} samples, {results['n_tokens']} response tokens), "
        f"{results['mask']} ablation at the input of the attention output projection.",
        "",
        f"Heads ranked by: {scores.get('name')}.",
        "",
        f"Base (nothing masked): loss {base['loss']:.4f}"
        + (
            f", accuracy {base['accuracy']:.3f} on {results['n_graded']} greedy answers"
            if base.get("accuracy") is not None
            else ""
        )
        + ".",
        "",
        "Loss increase = masked loss − base loss (token-weighted response cross-entropy over the whole set); "
        "accuracy drop = base accuracy − masked accuracy. Random: mean [min, max] over seeds "
        f"{info.get('seeds')}.",
        "",
        markdown_table(results),
        "",
        "![loss increase vs k](ablation.png)",
        "",
        "Every evaluation, with the masked heads: `results.csv`, `results.json`.",
    ]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """report.md, results.json, results.csv and ablation.png under `output`."""
    out = Path(output)
    paths = {name: out / name for name in REPORT_FILES}
    write_results_json(results, paths["results.json"])
    atomic_write_text(paths["results.csv"], csv_text(results["rows"]))
    plot(results, paths["ablation.png"])
    atomic_write_text(paths["report.md"], report_markdown(results))
    return paths


def write_results_json(results: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=2, allow_nan=True))


def read_results(output: str | Path) -> dict[str, Any]:
    path = Path(output) / "results.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the --output folder of a `lit_heads ablate` run.")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ logging


def log_results(logger, results: dict[str, Any], figure: str | Path | None = None) -> None:
    """Send the run to a Lightning logger (e.g. lit_heads.loggers.WandbLogger): the config as
    hyper-parameters, per k (as the step) every selection's loss increase and accuracy drop, the
    base numbers at step 0, the table of all evaluations and the plot."""
    logger.log_hyperparams({"ablate": results.get("config", {})})
    base = results["base"]
    logger.log_metrics({f"ablate/base/{m}": base[m] for m in ("loss", "accuracy") if base.get(m) is not None}, step=0)
    for entry in results["summary"]:
        metrics = {}
        for selection in SELECTIONS:
            for metric, spread in (entry.get(selection) or {}).items():
                if spread is None:
                    continue
                metrics[f"ablate/{selection}/{metric}"] = spread["mean"]
                if spread["n"] > 1:
                    metrics[f"ablate/{selection}/{metric}_min"] = spread["min"]
                    metrics[f"ablate/{selection}/{metric}_max"] = spread["max"]
        logger.log_metrics(metrics, step=entry["k"])
    if hasattr(logger, "log_table"):
        data = [
            [row[c] if c != "heads" else " ".join(f"{l}:{h}" for l, h in row["heads"]) for c in CSV_COLUMNS]
            for row in results["rows"]
        ]
        logger.log_table(key="ablate/evaluations", columns=list(CSV_COLUMNS), data=data)
    if figure is not None and hasattr(logger, "log_image"):
        logger.log_image(key="ablate/plot", images=[str(figure)])
    logger.save()


def results_document(
    *, config: dict, model: dict, scores: dict, mask: str, evaluator: Evaluator, run: dict, complete: bool = True
) -> dict[str, Any]:
    """Everything results.json holds, in one place so partial and final files have the same shape."""
    return {
        "config": config,
        "model": model,
        "scores": scores,
        "mask": mask,
        "n_samples": evaluator.n_samples,
        "n_tokens": evaluator.n_tokens,
        "n_graded": len(evaluator.graded),
        **run,
        "complete": complete,
    }


__all__ = [
    "Ablation",
    "Evaluator",
    "SELECTIONS",
    "check_schedule",
    "csv_text",
    "gradable",
    "log_results",
    "markdown_table",
    "plan_schedule",
    "plot",
    "read_results",
    "response_token_count",
    "results_document",
    "run_ablation",
    "summarize",
    "write_report",
]
