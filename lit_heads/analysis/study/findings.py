"""The stages of Findings 1 and 3 that train and measure the model (Finding 2 is `measures.composition`
on their patterns).

    Finding 1  SFT selectively activates task-specific heads: AP of every task before and after a short
               SFT on that task; between-task similarity of the pattern *changes* next to the within-task
               similarity of two disjoint halves of the same task's samples (the noise floor); Gini and
               CV before and after.
    Finding 3  pattern change over the steps of the complex task's SFT (MSE and correlation against the
               final pattern); SFT of only the top-k heads (by ΔAP) against full SFT, with a random-k
               control.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from lit_heads.analysis.study.measures import concentration, delta_halves, similarity, specificity
from lit_heads.analysis.study.runner import StudyRunner
from lit_heads.analysis.study.tasks import Task, probe
from lit_heads.analysis.study.tracker import PatternTracker


def full_sft_label(task: str) -> str:
    """`StudyRunner.state` after Finding 1's SFT on `task`."""
    return f"full SFT on {task}"


def _measure(runner: StudyRunner, sets: dict[str, dict[str, list]], names: list[str],
             ap_data=None) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Patterns of the current model on the probe of every mode for every task in `names`; a probe that is
    the same samples in several places (the shared modes, or 'complex' for the complex task) is scored once."""
    done: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {mode: {} for mode in sets}
    for mode, per_task in sets.items():
        for name in names:
            key = tuple(id(e) for e in per_task[name])
            if key not in done:
                done[key] = runner.halves(per_task[name], ap_data)
            out[mode][name] = done[key]
    return out


def finding1(runner: StudyRunner, tasks: dict[str, Task], steps: int, ap_samples: int, data=None, ap_data=None,
             track: str | None = None, patterns_dir: Path | None = None, probes: tuple[str, ...] = ("own",),
             complex_task: str | None = None) -> dict[str, Any]:
    """AP before and after SFT on each task; similarities (ΔAP and after-SFT AP) with the half-split
    noise floor; concentration before and after. Every model is measured on the probe of each mode in
    `probes` (see `tasks.probe`); the first mode is the main one, the others feed Finding 2's probe
    ablation. The SFT of task `track` records its pattern over the steps and is graded. Returns results
    plus the raw patterns under '_raw' (main mode at the top, every mode under 'probes')."""
    from lit_heads.heads import stats
    from lit_heads.heads.pattern import Pattern

    cfg = runner.cfg
    main = probes[0]
    sets = {mode: {n: probe(tasks, n, ap_samples, mode, complex_task) for n in tasks} for mode in probes}

    runner.reset()
    before = _measure(runner, sets, list(tasks), ap_data)
    after: dict[str, dict[str, Any]] = {mode: {} for mode in probes}
    seconds, tracked, full_sft_accuracy = {}, None, None
    for name, task in tasks.items():
        runner.reset()
        callbacks = []
        if name == track:
            batches = list((ap_data or runner.ap_data).make_dataloader(probe(tasks, name, cfg.track_samples)))
            callbacks = [PatternTracker(batches, cfg.track_every)]
        print(f"[study] SFT on {name}: {steps} steps", flush=True)
        seconds[name] = runner.train(task.train[: steps * cfg.batch_size], steps, cfg.seed, callbacks=callbacks,
                                     data=data, label=full_sft_label(name))
        for mode, row in _measure(runner, sets, [name], ap_data).items():
            after[mode][name] = row[name]
        if callbacks:
            tracked = callbacks[0].history
        if name == track:
            # The model is the complex task's full-SFT model right now: grade it before the next reset.
            full_sft_accuracy = runner.accuracy(task.heldout[: cfg.eval_samples])
    deltas = {mode: {n: delta_halves(before[mode][n], after[mode][n]) for n in tasks} for mode in probes}
    if patterns_dir is not None:
        for mode in probes:
            folder = patterns_dir if mode == main else patterns_dir / f"probe_{mode}"
            for name in tasks:
                for when, pats in (("before", before[mode][name]), ("after", after[mode][name]),
                                   ("delta", deltas[mode][name])):
                    meta = {"model": str(cfg.model), "data": name, "kind": when, "probe": mode}
                    Pattern(pats["full"], meta).save(folder / f"{name}_{when}.safetensors")
    k = cfg.top_k  # at most the number of heads (`StudyConfig.check_heads`)
    names = list(tasks)
    sims = {}
    for which, source in (("delta", deltas[main]), ("after", after[main])):
        for metric_name, metric in (("corr", stats.pearson), ("topk_jaccard", partial(stats.topk_jaccard, k=k))):
            matrix = similarity(source, metric)
            sims[f"{which}_{metric_name}"] = {"matrix": matrix, **specificity(matrix, names)}
    return {
        "tasks": names, "kinds": {n: t.kind for n, t in tasks.items()}, "top_k": k, "sft_steps": steps,
        "ap_samples": ap_samples, "probe": main, "train_seconds": seconds,
        "concentration": {n: {"before": concentration(before[main][n]["full"]),
                              "after": concentration(after[main][n]["full"])} for n in names},
        "similarity": sims,
        "full_sft_accuracy": full_sft_accuracy,
        "_raw": {"before": before[main], "after": after[main], "delta": deltas[main], "tracked": tracked,
                 "probes": {mode: {"before": before[mode], "after": after[mode], "delta": deltas[mode]}
                            for mode in probes}},
    }


def finding3_restricted(runner: StudyRunner, tasks: dict[str, Task], full_delta: dict[str, torch.Tensor],
                        before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Only k heads train (top-k by the complex task's full-SFT ΔAP, and k random heads): how much of
    the full-SFT pattern change and accuracy do they reproduce? Patterns on the main probe mode's
    samples for the complex task, those `full_delta` and `before` were measured on."""
    from lit_heads.heads import stats
    from lit_heads.heads.restrict import HeadRestriction
    from lit_heads.heads.selection import select_heads

    cfg = runner.cfg
    complex_task = tasks[cfg.complex_task]
    k = cfg.restricted_top_k
    arms = {"top": select_heads("top", runner.n_layers, runner.n_heads, top_k=k, scores=full_delta["full"])}
    if cfg.restricted_random:
        arms["random"] = select_heads("random", runner.n_layers, runner.n_heads, top_k=k, seed=cfg.seed)
    out: dict[str, Any] = {"k": k, "lr": cfg.restricted_lr, "arms": {}}
    for arm, heads in arms.items():
        runner.reset()
        restriction = HeadRestriction(runner.module.model, heads).apply()
        described = restriction.describe()
        print(f"[study] head-restricted SFT ({arm} {k} heads, {described['fraction']:.2%} of parameters)", flush=True)
        runner.train(complex_task.train[: cfg.sft_steps * cfg.batch_size], cfg.sft_steps, cfg.seed,
                     lr=cfg.restricted_lr)
        restriction.merge()
        after = runner.halves(probe(tasks, cfg.complex_task, cfg.ap_samples, cfg.main_probe, cfg.complex_task))
        delta = after["full"] - before["full"]
        out["arms"][arm] = {
            "heads": [list(h) for h in heads], "trainable_fraction": described["fraction"],
            "corr_delta_vs_full": stats.pearson(delta, full_delta["full"]),
            "mse_delta_vs_full": stats.mse(delta, full_delta["full"]),
            "delta_norm_ratio": float(delta.norm() / full_delta["full"].norm()),
            "accuracy": runner.accuracy(complex_task.heldout[: cfg.eval_samples]),
        }
    return out
