"""The study's report: report.md, the paper's numbers next to ours, with its figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lit_heads.analysis.study.application import ARM_LABELS, ARMS, PAPER_ARMS
from lit_heads.analysis.study.causal import RANKINGS
from lit_heads.analysis.study.config import run_folder
from lit_heads.analysis.study.figures import plot_application, plot_over_steps, plot_patterns, plot_similarity
from lit_heads.analysis.study.paper import PAPER
from lit_heads.atomic import atomic_write_text
from lit_heads.heads.pattern import heatmap


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _alpha(alpha: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:+.3f}" for k, v in alpha.items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _finding1_md(f1: dict, fig_patterns: str, fig_sim: str) -> list[str]:
    lines = [f"SFT of {f1['sft_steps']} steps per task; patterns on {f1['ap_samples']} held-out samples per task "
             f"(two disjoint halves of {f1['ap_samples'] // 2}).", ""]
    rows = []
    for name in f1["tasks"]:
        c = f1["concentration"][name]
        rows.append([name, f1["kinds"][name], _f(c["before"]["gini"]), _f(c["after"]["gini"]), _f(c["before"]["cv"]),
                     _f(c["after"]["cv"])])
    lines += _table(["task", "kind", "Gini before", "Gini after", "CV before", "CV after"], rows)
    lines += ["", "Paper (Llama3-8B): Gini 0.50 → 0.33 after SFT (the pattern spreads over more heads).", ""]
    for key, label in (("delta_corr", "ΔAP correlation"), ("delta_topk_jaccard", f"ΔAP top-{f1['top_k']} overlap"),
                       ("after_corr", "AP-after correlation")):
        s = f1["similarity"][key]
        lines.append(f"- {label}: within-task (half vs half) {_f(s['within_mean'])}, "
                     f"between tasks {_f(s['between_mean'])}")
    lines += ["", "Per task, ΔAP correlation within the task vs mean with the other tasks:", ""]
    per = f1["similarity"]["delta_corr"]["per_task"]
    lines += _table(["task", "within (noise floor)", "between (mean)"],
                    [[n, _f(v["within"]), _f(v["between_mean"])] for n, v in per.items()])
    lines += ["", f"![patterns](figures/{fig_patterns})", "", f"![similarity](figures/{fig_sim})", ""]
    return lines


NOISE_CEILING = (
    "**Noise ceiling**, defined: split the probe's samples into two disjoint halves A and B (even and odd "
    "positions); measure the target's ΔAP on each half (same models, same training run); fit ΔAP_A by ΔAP_B "
    "(least squares, one weight, no intercept, R² = 1 − SS_res/SS_tot over all heads) and B by A, and average the "
    "two R². It is the share of the target's head-to-head variation on one half that its own pattern on other "
    "samples explains: the most any fit made across halves can reach. **Cross-half R²** is the same fit with the "
    "components' ΔAP on the other half in place of the target's own, so it compares with the ceiling on equal "
    "terms (half the samples on each side, no sample shared). The whole-probe R² is the paper's number; in the "
    "shared probes (b, c) target and components are measured on the same samples, so their sampling noise is "
    "shared and can raise it, which the cross-half R² cannot profit from. (Two training seeds per task would add "
    "training noise to the ceiling; the study has one SFT run per task.)"
)

# Which probe the paper describes: argued from DESIGN.md's account of the method (see the report's text).
PAPER_PROBE = (
    "**Which probe the paper's description matches: (a), each model on its own task's held-out data.** The paper "
    "defines a head's activation through the SFT loss L of the samples it averages over (AP[l,h] = (1/N) Σ_samples "
    "|Σ Γ·∂L/∂Γ|, with L the response-token cross-entropy), so a pattern needs labelled samples of some task, and "
    "every statement is about the pattern *of a task*: SFT activates *task-specific* heads (Finding 1); the "
    "pattern *of the complex task* is a combination of the patterns *of the basic tasks* (Finding 2); the "
    "application regresses *the complex task's* pattern change on *the basic tasks'* changes. A basic task's "
    "pattern measured on the complex task's samples (b) or on a mix of everything (c) is not that task's pattern "
    "in this sense. The authors' release does not settle it: it scores saved checkpoints on GSM8K only, which is "
    "(a) for a model trained on math and (b) when math is the target task. (b) and (c) are our controls: they hold the "
    "probe fixed, so what remains of the composition is in the weights SFT changed, not in which samples were scored."
)


def _r2_cells(fits: dict) -> list[str]:
    return [_f(fits["lstsq"]["r2"]), _f(fits["nnls"]["r2"]), _f(fits.get("cross_half_r2"))]


def _finding2_md(f2: dict, target: str, fig_residual: str) -> list[str]:
    main = f2["main"]
    lines = [f"ΔAP({target}) ≈ Σ α_i ΔAP(basic_i) over all heads, without intercept.", ""]
    rows = [[f"{target} ≈ {' + '.join(f2['components'])}", _alpha(main["nnls"]["alpha"]), *_r2_cells(main)]]
    for label, fits in f2["controls"].items():
        rows.append([f"control: {label}", _alpha(fits["nnls"]["alpha"]), *_r2_cells(fits)])
    if "all_basic" in f2:
        rows.append(["all basic tasks", _alpha(f2["all_basic"]["nnls"]["alpha"]), *_r2_cells(f2["all_basic"])])
    lines += _table(["fit", "α (NNLS)", "R² lstsq", "R² NNLS", "R² cross-half (lstsq)"], rows)
    lines += ["", f"Noise ceiling: {_f(f2['noise_ceiling_r2'])} (defined below).",
              "Paper: R² 0.97 (math-with-code ≈ math + code), 0.95 (instruction mix ≈ reasoning + programming).", "",
              f"![residual](figures/{fig_residual})", ""]
    return lines


PROBE_LABELS = {"own": "(a) own task's held-out data", "complex": "(b) the complex task's held-out data",
                "mix": "(c) a fixed mix of all tasks' held-out data"}


def _best_control(f2: dict, key: str = "lstsq") -> float | None:
    values = [fits[key]["r2"] if key != "cross_half_r2" else fits[key] for fits in f2["controls"].values()]
    return max(values) if values else None


def _probes_md(probes: dict, main: str) -> list[str]:
    """Finding 2 measured three ways: the composition, its controls and the noise ceiling per probe mode."""
    rows = []
    for mode, f2 in probes.items():
        rows.append([PROBE_LABELS[mode] + (" (main)" if mode == main else ""), _f(f2["main"]["lstsq"]["r2"]),
                     _f(f2["main"]["cross_half_r2"]), _f(_best_control(f2)), _f(_best_control(f2, "cross_half_r2")),
                     _f(f2["noise_ceiling_r2"])])
    lines = _table(["every model's pattern measured on", "composition R²", "composition R² cross-half",
                    "best control R²", "best control R² cross-half", "noise ceiling"], rows)
    lines += ["", "Every fit, R² (whole probe / cross-half) per probe:", ""]
    labels = ["main"] + list(next(iter(probes.values()))["controls"]) + ["all_basic"]
    rows = []
    for label in labels:
        cells = []
        for f2 in probes.values():
            fits = f2["main"] if label == "main" else f2.get(label) or f2["controls"].get(label)
            cells.append(f"{_f(fits['lstsq']['r2'])} / {_f(fits['cross_half_r2'])}" if fits else "n/a")
        name = f"{' + '.join(next(iter(probes.values()))['components'])}" if label == "main" else label
        rows.append([name.replace("all_basic", "all basic tasks"), *cells])
    lines += _table(["fit", *[PROBE_LABELS[m].split(" ", 1)[0] for m in probes]], rows)
    lines += ["", NOISE_CEILING, "", PAPER_PROBE, ""]
    return lines


def _pct(stat: dict) -> str:
    """Accuracy summary as 'mean ± CI half-width' (or ± std without a CI), in percent."""
    if stat.get("n", 2) < 2:  # one run has no spread to show
        return f"{100 * stat['mean']:.1f}"
    spread = stat.get("half_width", stat["std"])
    return f"{100 * stat['mean']:.1f} ± {100 * spread:.1f}"


def _spread_name(app: dict) -> str:
    return f"{100 * app['ci']:.0f}% t-interval half-width" if app.get("ci") else "standard deviation"


def _paper_gains(named: bool = False) -> str:
    """The paper's AP-guided minus random-mix gain per model, from its table."""
    table = PAPER["application_math_benchmark"]
    ap, rnd = table["columns"].index("AP-guided mix first"), table["columns"].index("random mix first")
    models = [m for m in table if m != "columns"]
    return " / ".join(f"{m + ' ' if named else ''}{table[m][ap] - table[m][rnd]:+.2f}" for m in models)


def _paired_verdict(d: dict) -> str:
    if "low" not in d:
        return "no interval (ci: null)"
    if d["low"] > 0:
        return "AP-guided better (interval above 0)"
    if d["high"] < 0:
        return "AP-guided worse (interval below 0)"
    return "no difference resolved (interval spans 0)"


def _differences(results: dict) -> list[str]:
    """Plain statements of where our numbers differ from the paper's."""
    out = []
    f2 = results["finding2"]
    r2 = f2["main"]["lstsq"]["r2"]
    best_control = max((fits["lstsq"]["r2"] for fits in f2["controls"].values()), default=float("nan"))
    if r2 < 0.9:
        out.append(f"Composition R² is {r2:.2f} (probe {f2.get('probe', 'own')}), below the paper's 0.97; "
                   f"the noise ceiling is {f2['noise_ceiling_r2']:.2f}.")
    else:
        out.append(f"Composition R² {r2:.2f} is close to the paper's 0.97.")
    if not math.isnan(best_control):
        verdict = "above" if best_control >= r2 else "below"
        meaning = ("so here the composition is not specific to its components" if verdict == "above"
                   else "the components explain more than an unrelated task does")
        out.append(f"The best control fit (a non-component basic task swapped in) reaches R² {best_control:.2f}, "
                   f"{verdict} the real composition ({r2:.2f}); {meaning}.")
    for mode, fits in results.get("probes", {}).items():
        if mode != f2.get("probe", "own"):
            out.append(f"Probe {PROBE_LABELS[mode]}: composition R² {_f(fits['main']['lstsq']['r2'], 2)}, best control "
                       f"{_f(_best_control(fits), 2)}, noise ceiling {_f(fits['noise_ceiling_r2'], 2)}.")
    conc = results["finding1"]["concentration"]
    drops = sum(conc[n]["after"]["gini"] < conc[n]["before"]["gini"] for n in conc)
    out.append(f"Gini fell after SFT for {drops} of {len(conc)} tasks (paper: 0.50 → 0.33, a fall).")
    ablation = results.get("ablation")
    for name, ranking in (ablation or {}).get("rankings", {}).items():
        held = ("passes: masking its top-k raises the held-out loss more than random-k at every k"
                if ranking["passes"]["all"] else
                "does not pass: masking its top-k does not raise the held-out loss more than random-k at every k")
        out.append(f"Causal check, ranked by {ranking['label']}: the ranking {held}; top-k − random-k loss increase "
                   f"{_causal_verdict(ablation, name)}. The paper ranks heads by AP without such a check.")
    app = results["application"]
    acc = app["accuracy"]
    means = [acc[a]["mean"] for a in PAPER_ARMS]
    if all(x < y for x, y in zip(means, means[1:])):
        out.append("The application arms rank as in the paper: Base < SFT < random mix < AP-guided mix.")
    else:
        order = sorted((a for a in ARMS if a in acc), key=lambda a: acc[a]["mean"])
        ranked = ", ".join(f"{ARM_LABELS[a]} {100 * acc[a]['mean']:.1f}%" for a in order)
        out.append("The application arms do not rank strictly as in the paper (Base < SFT < random mix < AP-guided "
                   f"mix); ours, lowest first: {ranked}.")
    d = app.get("paired", {}).get("ap_mix - random_mix")
    if d:
        interval = f", {100 * d['ci']:.0f}% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if "low" in d else ""
        out.append(f"AP-guided minus random mix, paired by seed: {100 * d['mean']:+.1f} points{interval} over "
                   f"{d['n']} seeds: {_paired_verdict(d)} (paper: {_paper_gains()} points, one run each, no interval).")
    m = results["model"]
    out.append(f"Scale differs: `{m['name']}` ({m['layers']}x{m['heads']} heads), tens of SFT steps, generated tasks, "
               "against 7-8B models trained on thousands of samples and graded on a math benchmark.")
    return out


def _application_md(app: dict, cfg: dict, model: str, fig_app: str) -> list[str]:
    acc = app["accuracy"]
    lines = [f"α from the {app['alpha_fit']['method']} fit of ΔAP({cfg['complex_task']}) on "
             f"{app['alpha_fit']['bases']} (probe {app['alpha_fit'].get('probe', 'own')}, R² "
             f"{_f(app['alpha_fit']['r2'])}): {_alpha(app['alpha'])}. Rule for negative/zero α: `{app['rule']}` "
             "(clip: a negative weight becomes 0 and the rest are renormalised, so that task gets no samples; "
             "all α ≤ 0 is an error).", "",
             f"Each mix has N = {app['n_mix']} basic-task samples, task i getting N·w_i/Σw, drawn from training pools "
             f"of {app['pool_sizes']} samples: AP-guided w = α; size-weighted w = pool size; random w drawn uniformly "
             "from the simplex per seed. Counts per seed:", ""]
    lines += _table(["mix", *[f"seed {s}" for s in app["seeds"]]],
                    [[ARM_LABELS[arm], *[", ".join(f"{t} {n}" for t, n in c.items()) for c in counts]]
                     for arm, counts in app["mix_counts"].items()])
    lines += ["",
              f"**Budget, matched:** every trained arm takes {app['steps']['complex_only']} optimizer steps at batch "
              f"{cfg['batch_size']}. Complex-only SFT spends all {app['steps']['complex_only']} on the "
              f"{app['complex_train_size']} scarce complex samples; each mix arm spends {app['steps']['mix']} on its "
              f"mix (one pass) and then {app['steps']['complex']} on the same {app['complex_train_size']} complex "
              "samples. Each stage starts a fresh AdamW with its own warmup and cosine decay. A seed draws the scarce "
              "set (shared by all arms of that seed), the shuffles and the mixes. Graded on "
              f"{app['eval_samples']} held-out complex samples (greedy, exact checker), seeds {app['seeds']}; "
              f"± is the {_spread_name(app)} over seeds. Base is the untrained model, one deterministic run.", ""]
    paper = PAPER["application_math_benchmark"]
    header = ["", *[ARM_LABELS[a] for a in ARMS]]
    rows = [[f"paper, {name} (math benchmark)", *[f"{paper[name][PAPER_ARMS.index(a)]:.2f}" if a in PAPER_ARMS else "—"
                                                   for a in ARMS]]
            for name in ("Llama-7B", "Llama2-7B", "Llama3-8B")]
    rows.append([f"ours, {model} ({cfg['complex_task']})", *[_pct(acc[a]) if a in acc else "n/a" for a in ARMS]])
    lines += _table(header, rows)
    if app.get("paired"):
        lines += ["", "Paired differences (same seed, same scarce samples), in accuracy points:", ""]
        rows = []
        for key, d in app["paired"].items():
            other = key.split(" - ")[1]
            interval = f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if "low" in d else "n/a"
            rows.append([f"AP-guided − {ARM_LABELS[other].split(' → ')[0]}", f"{100 * d['mean']:+.1f}", interval,
                         ", ".join(f"{100 * v:+.1f}" for v in d["values"]), _paired_verdict(d)])
        interval_name = f"{100 * app['ci']:.0f}% CI" if app.get("ci") else "CI"
        lines += _table(["difference", "mean", interval_name, "per seed", "reading"], rows)
        lines += ["", f"Paper, AP-guided − random mix (one run each, no interval): {_paper_gains(named=True)} points."]
    lines += ["", f"![application](figures/{fig_app})", ""]
    return lines


def _causal_view(ablation: dict, name: str) -> dict:
    """One ranking's part of the causal check in the shape `lit_heads.analysis.ablation` draws and tabulates."""
    ranking = ablation["rankings"][name]
    return {"summary": ranking["summary"], "base": ablation["base"], "mask": ablation["mask"],
            "scores": {"name": ranking["label"]}}


def _causal_verdict(ablation: dict, name: str) -> str:
    """Top-k minus random-k loss increase at the largest k, and whether top-k hurt more at every k."""
    ranking = ablation["rankings"][name]
    per_k = ranking["passes"]["per_k"]
    last = per_k[-1]
    held = sum(v["above_mean"] for v in per_k)
    return (f"{last['top_minus_random']:+.3f} at k={last['k']}; top-k above random-k at {held} of {len(per_k)} k"
            + (", above every random seed at the largest k" if last["above_every_seed"] else ""))


def _causal_md(ablation: dict, figures: Path) -> list[str]:
    from lit_heads.analysis.ablation import markdown_table, plot

    lines = [f"On the complex task's fully fine-tuned model (Finding 1's SFT), {ablation['mask']} ablation at the "
             "input of the attention output projection (`lit_heads ablate`'s logic), of the top-k and bottom-k heads "
             f"of each ranking and of k random heads (seeds {ablation['seeds']}, the same heads for both rankings). "
             f"Loss = token-weighted response cross-entropy on {ablation['n_samples']} held-out `{ablation['task']}` "
             f"samples ({ablation['n_tokens']} response tokens) that neither ranked the heads nor were graded; "
             f"unmasked: {ablation['base']['loss']:.4f}. Random: mean [min, max] over seeds. A ranking passes when "
             "masking its top-k raises the loss more than masking random-k.", ""]
    for name, ranking in ablation["rankings"].items():
        view = _causal_view(ablation, name)
        figure = plot(view, figures / f"ablation_{name}.png").name
        lines += [f"### Ranked by {ranking['label']}", "", markdown_table(view), "",
                  f"Top-k − random-k loss increase: {_causal_verdict(ablation, name)}.", "",
                  f"![ablation by {ranking['label']}](figures/{figure})", ""]
    return lines


def write_report(out: Path, results: dict, raw: dict, residual: np.ndarray, raw_real: dict | None = None) -> Path:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    f1, f2, f3, app = results["finding1"], results["finding2"], results["finding3"], results["application"]
    cfg = results["config"]
    names = f1["tasks"]

    fig_patterns = plot_patterns(raw, names, figures / "patterns.png")
    fig_sim = plot_similarity(f1["similarity"], names, figures / "similarity_delta.png")
    plot_similarity(f1["similarity"], names, figures / "similarity_after.png", which="after")
    heatmap(residual, figures / "residual.png", title=f"residual of ΔAP({cfg['complex_task']}) ≈ Σ α ΔAP(basic), lstsq",
            cmap="coolwarm")
    fig_steps = plot_over_steps(f3["over_steps"], figures / "pattern_change.png") if f3.get("over_steps") else None
    fig_app = plot_application(app, figures / "application.png")

    m = results["model"]
    lines = [
        "# lit_heads study: reproducing arXiv 2409.15820", "",
        f"Model `{m['name']}` ({m['layers']} layers × {m['heads']} heads). Basic tasks {cfg['basic_tasks']}, "
        f"complex task `{cfg['complex_task']}` = {' + '.join(f2['components'])}; controls (basic tasks not in the "
        f"composite): {[t for t in cfg['basic_tasks'] if t not in f2['components']]}. "
        f"Wall time {results['seconds']['total'] / 60:.1f} min "
        f"(planned ~{results['budget']['eta_s'] / 60:.1f} min).", "",
        "## Paper vs ours at a glance", "",
    ]
    acc = app["accuracy"]
    gini = f1["concentration"][cfg["complex_task"]]
    glance = [
        [f"composition R² (lstsq / NNLS), probe {f2.get('probe', 'own')}", "0.97 (math+code), 0.95 (instruction)",
         f"{_f(f2['main']['lstsq']['r2'])} / {_f(f2['main']['nnls']['r2'])}"],
        ["noise ceiling (defined under Finding 2)", "not reported", _f(f2["noise_ceiling_r2"])],
        ["control R² (non-component swapped in, best)", "not reported", _f(_best_control(f2))],
        ["Gini before → after (complex task)", "0.50 → 0.33 (Llama3)",
         f"{_f(gini['before']['gini'])} → {_f(gini['after']['gini'])}"],
        [f"application: {' / '.join(ARM_LABELS[a] for a in ARMS)} (%)",
         "Llama3-8B 46.12 / 49.22 / 50.10 / — / 52.33", " / ".join(_pct(acc[a]) for a in ARMS if a in acc)],
    ]
    ablation = results.get("ablation")
    for name in (ablation or {}).get("rankings", {}):
        glance.append([f"causal check, {ablation['rankings'][name]['label']}: top-k − random-k loss increase",
                       "not reported", _causal_verdict(ablation, name)])
    lines += _table(["measure", "paper", "ours"], glance)
    lines += ["", "Where ours differ:", "", *[f"- {d}" for d in _differences(results)], ""]

    lines += ["## Finding 1: SFT activates task-specific heads", "", *_finding1_md(f1, fig_patterns, fig_sim)]
    lines += ["## Finding 2: the complex pattern is a combination of the basic ones", "",
              *_finding2_md(f2, cfg["complex_task"], "residual.png")]
    if results.get("probes"):
        lines += ["### Probe ablation: on which samples the patterns are measured", "",
                  *_probes_md(results["probes"], f2.get("probe", "own"))]

    if ablation:
        lines += ["## Causal check: does masking the top-ranked heads hurt more than random ones?", "",
                  *_causal_md(ablation, figures)]

    lines += ["## Finding 3: few parameter changes move the pattern a lot", ""]
    if fig_steps:
        over = f3["over_steps"]
        lines += [f"Pattern of `{cfg['complex_task']}` during its SFT against the final pattern "
                  f"(paper: {PAPER['pattern_change']}):", ""]
        steps = zip(over["steps"], over["mse_vs_final"], over["corr_vs_final"])
        lines += _table(["step", "MSE vs final", "corr vs final"], [[str(s), f"{e:.3g}", _f(c)] for s, e, c in steps])
        lines += ["", f"![pattern change](figures/{fig_steps})", ""]
    r = f3["restricted"]
    rows = [["base (no SFT)", "0", "", "", _f(100 * f3["base_accuracy"], 1)],
            ["full SFT", "100%", "1", "1", _f(100 * f3["full_sft_accuracy"], 1)]]
    for arm, v in r["arms"].items():
        rows.append([f"{arm} {r['k']} heads only (lr {r['lr']:g})", f"{100 * v['trainable_fraction']:.2f}%",
                     _f(v["corr_delta_vs_full"]), _f(v["delta_norm_ratio"]), _f(100 * v["accuracy"], 1)])
    lines += _table(["arm", "parameters trained", "ΔAP corr with full SFT", "|ΔAP| / |ΔAP full|",
                     "held-out accuracy (%)"], rows)
    lines += [""]

    lines += ["## Application: AP-guided data mixing", "", *_application_md(app, cfg, m["name"], fig_app)]

    if "real" in results and raw_real is not None:
        real = results["real"]
        fig_real = plot_patterns(raw_real, real["finding1"]["tasks"], figures / "patterns_real.png")
        fig_real_sim = plot_similarity(real["finding1"]["similarity"], real["finding1"]["tasks"],
                                       figures / "similarity_real.png")
        lines += ["## Real tasks: GSM8K, HumanEval, GSM8K as Python", "",
                  f"Sizes: {real['sizes']}. HumanEval has no single answer, so real tasks get patterns and "
                  "composition, no accuracy. Patterns on each task's own held-out samples (probe a).", "",
                  "### Task-specific heads", "", *_finding1_md(real["finding1"], fig_real, fig_real_sim)]
        heatmap(np.load(out / "patterns" / "residual_real.npy"), figures / "residual_real.png",
                title="residual of ΔAP(gsm8k_python) ≈ Σ α ΔAP, lstsq", cmap="coolwarm")
        lines += ["### Composition: GSM8K-as-Python ≈ GSM8K + HumanEval", "",
                  *_finding2_md(real["finding2"], "gsm8k_python", "residual_real.png")]

    lines += ["## Files", "", "- `results.json`: every number above, with the config and timings.",
              "- `patterns/<task>_{before,after,delta}.safetensors`: patterns on the main probe (`lit_heads compose` "
              "reads them); `patterns/probe_<mode>/` the same on the other probes.",
              "- `mix/{random_mix,size_mix,ap_mix}.jsonl`: the first seed's mixes.",
              "- `figures/ablation_{ap,abs_delta}.png`: the causal check per ranking; every masked evaluation, with "
              "its heads, is in `results.json` under `ablation`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# Config fields that say which model ran, where, and how long it was expected to take: they may differ between
# the columns of one comparison. Every other field (tasks, seeds, steps, batch, samples...) shapes the numbers.
_NOT_PROFILE = ("model", "output", "device", "progress_bar", "shared_data", "combine")


def profile_differences(configs: list[dict]) -> dict[str, list]:
    """{field: its value in each run} for every profile field on which the runs do not all agree."""
    keys = sorted({k for c in configs for k in c if k not in _NOT_PROFILE and not k.startswith("sec_per_")})
    values = {k: [c.get(k) for c in configs] for k in keys}
    return {k: v for k, v in values.items() if any(x != v[0] for x in v[1:])}


def write_side_by_side(out: Path, runs: dict[str, dict]) -> Path:
    """report.md with the paper and every run in one table; says so when the runs' profiles differ."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(runs)
    first = runs[names[0]]["config"]
    differ = profile_differences([runs[n]["config"] for n in names])

    def cell(results: dict, what: str) -> str:
        f1, f2, app = results["finding1"], results["finding2"], results["application"]
        if what == "delta":
            s = f1["similarity"]["delta_corr"]
            return f"{_f(s['within_mean'])} vs {_f(s['between_mean'])}"
        if what == "gini":
            g = f1["concentration"][results["config"]["complex_task"]]
            return f"{_f(g['before']['gini'])} → {_f(g['after']['gini'])}"
        if what.startswith("probe:"):
            fits = results.get("probes", {}).get(what[6:])
            if not fits:
                return "n/a"
            return (f"{_f(fits['main']['lstsq']['r2'])} (cross-half {_f(fits['main']['cross_half_r2'])}; control "
                    f"{_f(_best_control(fits))}; ceiling {_f(fits['noise_ceiling_r2'])})")
        if what == "f2":
            return _f(f2["main"]["lstsq"]["r2"])
        if what == "f3":
            f3 = results["finding3"]
            arms = f3["restricted"]["arms"]
            return " / ".join([_f(100 * f3["full_sft_accuracy"], 1),
                               *[_f(100 * a["accuracy"], 1) for a in arms.values()]])
        if what in ARMS:
            return _pct(app["accuracy"][what]) if what in app["accuracy"] else "n/a"
        if what == "paired":
            d = app.get("paired", {}).get("ap_mix - random_mix")
            if not d:
                return "n/a"
            interval = f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if "low" in d else ""
            return f"{100 * d['mean']:+.1f}{interval}"
        if what.startswith("causal:"):
            ablation = results.get("ablation")
            if not ablation or what[7:] not in ablation["rankings"]:
                return "n/a"
            return _causal_verdict(ablation, what[7:])
        if what == "minutes":
            return f"{results['seconds']['total'] / 60:.1f}"
        raise KeyError(what)

    paper = PAPER["application_math_benchmark"]["Llama3-8B"]
    rows = [("Finding 1: ΔAP corr within vs between tasks", "—", "delta"),
            ("Finding 1: Gini before → after (complex task)", "0.50 → 0.33 (Llama3-8B)", "gini"),
            ("Finding 2: composition R² (main probe)", "0.97 (math + code), 0.95", "f2")]
    probes = [p for p in ("own", "complex", "mix") if any(p in r.get("probes", {}) for r in runs.values())]
    rows += [(f"Finding 2, probe {PROBE_LABELS[p]}: R² (cross-half; best control; noise ceiling)", "—", f"probe:{p}")
             for p in probes]
    rows += [(f"Causal check, ranked by {label}: top-k − random-k loss increase", "—", f"causal:{name}")
             for name, label in RANKINGS.items()]
    rows += [("Finding 3: accuracy full SFT / top-k heads / random-k heads (%)", "—", "f3")]
    rows += [(f"Application: {ARM_LABELS[a]} (%)", f"{paper[PAPER_ARMS.index(a)]:.2f} (Llama3-8B)" if a in PAPER_ARMS
              else "—", a) for a in ARMS]
    rows += [("Application: AP-guided − random mix, paired (points, CI)", f"{_paper_gains()} (no CI)", "paired"),
             ("wall time (min)", "—", "minutes")]
    models = [f"{run_folder(runs[n]['model']['name'])} ({runs[n]['model']['layers']}×{runs[n]['model']['heads']} heads)"
              for n in names]
    lines = ["# lit_heads study: models side by side", "",
             f"Complex task `{first['complex_task']}`, basic tasks {first['basic_tasks']}, seeds {first['seeds']}. "
             "Each model's own report: " + ", ".join(f"`{n}`" for n in names) + ".", ""]
    if differ:
        fields = "; ".join(f"`{k}` ({', '.join(json.dumps(v) for v in values)})" for k, values in differ.items())
        lines += [f"**The runs differ in their profiles**, so their columns are not a like-for-like comparison: "
                  f"{fields}, in the order of the columns.", ""]
    lines += _table(["measure", "paper", *models], [[label, p, *[cell(runs[n], what) for n in names]]
                                                    for label, p, what in rows])
    lines += ["", "± is the t-interval half-width over seeds where the runs asked for one (ci), else the standard "
              "deviation. Noise ceiling and cross-half R² are defined in each run's report.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
