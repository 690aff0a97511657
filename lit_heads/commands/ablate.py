"""`lit_heads ablate`: does a head ranking point at heads the model needs? Mask the top-k heads, k random
heads (several seeds) and the bottom-k heads, for a schedule of k, and report the held-out loss increase
and accuracy drop.

    lit_heads ablate --model smollm2-135m --data generated:math_code --k 1 3 9 27
    lit_heads ablate --model runs/quickstart/export --scores out/ap/pattern.safetensors --mask zero
    lit_heads ablate --model runs/study/export --scores runs/study/patterns/math_code_delta.safetensors --scores_abs
    lit_heads ablate --config configs/ablate.yaml --num_generate 0          # loss only

Writes report.md, results.json, results.csv, ablation.png and scores.safetensors (the ranking used)
to --output. `--logger lit_heads.loggers.WandbLogger` (or a `logger:` block in the YAML) also sends
the numbers, the table and the plot to W&B.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger

from lit_heads.errors import ConfigError

DESCRIPTION = (
    "Causal check of a head ranking: mask the top-k, k random and the bottom-k heads (zero or mean ablation at "
    "the input of the attention output projection) for a schedule of k; report the held-out loss increase and "
    "accuracy drop as a table and a plot."
)
# Read shell-style (see normalize_argv): `--k 1 3 9 27`, `--scores_abs`.
LIST_OPTIONS = ("--k", "--seeds", "--selections")
BOOL_OPTIONS = ("--scores_abs",)


def ablate(
    model: str = "smollm2-135m",
    data: str = "generated:math_code",
    n_samples: int = 64,
    k: list[int] = [1, 3, 9, 27],  # noqa: B006 - jsonargparse reads the default from the signature
    selections: list[str] = ["top", "random", "bottom"],  # noqa: B006
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    mask: str = "mean",
    scores: str = "ap",
    scores_before: str | None = None,
    scores_abs: bool = False,
    ap_samples: int = 32,
    mean_data: str | None = None,
    mean_samples: int | None = None,
    num_generate: int = 32,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    max_length: int = 512,
    format: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    seed: int = 42,
    output: str = "out/ablate",
    logger: Logger | None = None,
) -> dict:
    """Mask k heads chosen by a score pattern, by chance and from the bottom of the ranking, and measure
    what the model loses on a task's held-out data.

    Args:
        model: bundled short name, HF directory (e.g. a `lit_heads fit` export), .gguf file, Lightning
            checkpoint (.ckpt from `lit_heads fit`) or hub id.
        data: held-out data: a .jsonl/.json/.parquet file, a hub id, or generated:<task>[,<task>...]
            (the first n_samples of each task's stream at --seed: the validation part of a `lit_heads fit`
            with the same seed and val_size >= n_samples).
        n_samples: held-out samples the loss is measured on (the first ones of --data).
        k: numbers of heads to mask, e.g. 1 3 9 27 (each at most the model's number of heads).
        selections: top (highest scores), random (one run per seed) and/or bottom (lowest scores).
        seeds: seeds of the random selections.
        mask: zero (the heads output zeros) or mean (each head outputs its mean over the probe data).
        scores: the ranking: 'ap' (the activation pattern of this model on the first ap_samples of --data,
            computed now) or a pattern file (.safetensors from `lit_heads ap` or the study, or an L x H .npy).
        scores_before: a pattern file subtracted from --scores (ranks by ΔAP = scores - scores_before).
        scores_abs: rank by the absolute value (|ΔAP|: heads that changed most, in either direction).
        ap_samples: samples of --data the 'ap' scores are computed on.
        mean_data: probe data of the mean ablation, in the forms of --data; null: the held-out data itself.
        mean_samples: samples of mean_data (null: n_samples).
        num_generate: held-out prompts answered greedily and graded by the task's checker (0: loss only).
        max_new_tokens: generation budget per graded answer.
        batch_size: samples per forward pass (loss, means and AP) and prompts per generation batch.
        max_length: tokens per sample (longer responses are truncated, and counted).
        format: record format of a data file (auto-detected by default).
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        attn_implementation: sdpa, eager, ...
        seed: seed of generated tasks.
        output: folder for report.md, results.json, results.csv, ablation.png and scores.safetensors.
        logger: a Lightning logger (lit_heads.loggers.WandbLogger: offline unless an API key is set and the
            server answers) that also receives the numbers, the table and the plot; null: files only.
    """
    # The options as given (locals() holds only the arguments here), recorded in results.json.
    config = {name: value for name, value in locals().items() if name != "logger"}
    from lit_heads.analysis import ablation as analysis
    from lit_heads.atomic import writable_dir
    from lit_heads.data import SFTDataModule, load_source
    from lit_heads.heads.ablation import MASK_MODES

    # ---- every check that can fail, before the model is loaded
    if mask not in MASK_MODES:
        raise ConfigError(
            f"--mask {mask!r} is not a mask mode; use 'zero' (masked heads output zeros) or 'mean' (each masked head "
            f"outputs its mean over the probe data)."
        )
    positive = {
        "n_samples": n_samples,
        "batch_size": batch_size,
        "max_length": max_length,
        "ap_samples": ap_samples,
        "max_new_tokens": max_new_tokens,
        "mean_samples": 1 if mean_samples is None else mean_samples,
    }
    bad = {name: value for name, value in positive.items() if value < 1}
    if bad or num_generate < 0:
        raise ConfigError(
            f"{bad or {'num_generate': num_generate}}: {', '.join(positive)} must be >= 1 (mean_samples may be null) "
            f"and num_generate >= 0 (0 skips the accuracy)."
        )
    analysis.check_schedule(k, None, selections, seeds)
    ranking = _load_scores(scores, scores_before, scores_abs)
    out = writable_dir(output)
    examples = load_source(data, size=n_samples, seed=seed, format=format)[:n_samples]
    if not examples:
        raise ConfigError(f"--data {data!r} holds no examples; give a data set with at least one.")
    analysis.gradable(examples, num_generate)
    probe = examples
    if mask == "mean" and mean_data is not None:
        size = mean_samples or n_samples
        probe = load_source(mean_data, size=size, seed=seed, format=format)[:size]
    n_layers, n_heads = _head_shape(model, attn_implementation)
    ks = analysis.check_schedule(k, n_layers * n_heads, selections, seeds)
    for pattern in (ranking, None if scores_before is None else _load_pattern(scores_before)):
        if pattern is not None:
            pattern.check_shape(n_layers, n_heads)

    # ---- the work
    from lit_heads.heads.ablation import head_output_means
    from lit_heads.module import SFTModule

    started = time.perf_counter()
    run_device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    )
    module = SFTModule(model, num_generate=0, max_new_tokens=max_new_tokens, attn_implementation=attn_implementation)
    module.to(run_device).eval()
    datamodule = SFTDataModule(
        tokenizer=module.tokenizer, batch_size=batch_size, max_length=max_length, format=format, seed=seed
    )
    evaluator = analysis.Evaluator(module, datamodule, examples, num_generate, generate_batch_size=batch_size)
    n_masked = len(ks) * sum(len(seeds) if s == "random" else 1 for s in selections)
    seeds_text = f" (seeds {list(seeds)})" if "random" in selections else ""
    answers_text = f" and {len(evaluator.graded)} greedy answers" if evaluator.graded else ""
    print(
        f"[ablate] {model}: {n_layers} layers x {n_heads} heads; {mask} ablation of k = {ks} heads for "
        f"{', '.join(selections)}{seeds_text}: {n_masked} masked evaluations + 1 base, each the loss on "
        f"{evaluator.n_samples} samples{answers_text}",
        flush=True,
    )

    if ranking is None and any(s != "random" for s in selections):
        ranking = _ap_ranking(module.model, datamodule, examples[:ap_samples], model, data, scores_before, scores_abs)
    means = None
    if mask == "mean":
        print(f"[ablate] head output means over {len(probe)} probe samples", flush=True)
        means = head_output_means(module.model, datamodule.make_dataloader(probe))
    schedule = analysis.plan_schedule(
        None if ranking is None else ranking.scores, n_layers, n_heads, ks, selections, seeds
    )

    score_info = {
        "name": "none (random only)" if ranking is None else ranking.meta["ranking"],
        "source": scores,
        "before": scores_before,
        "abs": scores_abs,
    }
    document = functools.partial(
        analysis.results_document,
        config={**config, "k": ks, "device": str(run_device)},
        model={"name": model, "n_layers": n_layers, "n_heads": n_heads},
        scores=score_info,
        mask=mask,
        evaluator=evaluator,
    )

    def save_partial(base: dict, rows: list[dict]) -> None:
        # A long run that dies late keeps what it measured.
        run = {"base": base, "rows": rows, "summary": analysis.summarize(rows)}
        analysis.write_results_json(document(run=run, complete=False), out / "results.json")

    written = []
    if ranking is not None:
        written.append(ranking.save(out / "scores.safetensors").name)
    results = document(
        run=analysis.run_ablation(evaluator, module.model, schedule, mode=mask, means=means, on_row=save_partial)
    )
    results["seconds"] = round(time.perf_counter() - started, 1)
    written += [path.name for path in analysis.write_report(results, out).values()]
    print(analysis.markdown_table(results))
    print(f"[ablate] done in {results['seconds']:.0f} s; wrote {out}/{', '.join(written)}", flush=True)
    if logger is not None:
        analysis.log_results(logger, results, out / "ablation.png")
    return results


def _ap_ranking(net, datamodule, examples: list, model: str, data: str, scores_before: str | None, scores_abs: bool):
    """The activation pattern of the loaded model on `examples`, computed now (then ΔAP and |.| as asked)."""
    from lit_heads.heads import compute_ap

    print(f"[ablate] activation pattern of the model on {len(examples)} samples of {data}", flush=True)
    pattern = compute_ap(net, datamodule.make_dataloader(examples), progress=False, meta={"model": model, "data": data})
    return _transform(pattern, f"AP of this model on {data} ({len(examples)} samples)", scores_before, scores_abs)


def _load_pattern(path: str):
    from lit_heads.commands.compose import load_pattern

    return load_pattern(path)


def _load_scores(scores: str, scores_before: str | None, scores_abs: bool):
    """The ranking pattern from files (None when it is computed on the spot: scores == 'ap')."""
    if scores == "ap":
        return None
    if not Path(scores).suffix:
        raise ConfigError(f"--scores {scores!r}: use 'ap' (computed now) or a pattern file (.safetensors or .npy).")
    return _transform(_load_pattern(scores), scores, scores_before, scores_abs)


def _transform(pattern, name: str, scores_before: str | None, scores_abs: bool):
    """pattern − the scores_before pattern (ΔAP) and |.| as asked; meta["ranking"] says which in words."""
    from lit_heads.heads.pattern import Pattern

    values = pattern.scores
    if scores_before is not None:
        before = _load_pattern(scores_before)
        if before.shape != pattern.shape:
            raise ConfigError(
                f"--scores_before has shape {list(before.shape)} but the scores {list(pattern.shape)} [layers, heads]; "
                f"both patterns must come from the same model."
            )
        values = values - before.scores
        name = f"{name} − {scores_before}"
    if scores_abs:
        values = values.abs()
        name = f"|{name}|"
    return Pattern(values, {**pattern.meta, "ranking": name})


def _head_shape(model: str, attn_implementation: str | None) -> tuple[int, int]:
    """(layers, heads) of a model from its config alone: the module tree is built on the meta device
    (no weights, no memory) and `find_heads` reads it, so a bad --k or a scores file of the wrong
    shape is refused before the weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_heads.heads import find_heads
    from lit_heads.models import resolve

    config = AutoConfig.from_pretrained(resolve(model).path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return find_heads(skeleton).shape


def normalize_argv(argv: list[str]) -> list[str]:
    """Shell-style flags for jsonargparse, which wants one value per flag: `--k 1 3 9` becomes
    `--k [1, 3, 9]` (the values up to the next `--flag`), and a bare `--scores_abs` becomes
    `--scores_abs true`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values = argv[i + 1 : j]
        if arg in LIST_OPTIONS and values and not (len(values) == 1 and values[0].lstrip().startswith("[")):
            out += [arg, "[" + ", ".join(values) + "]"]
        elif arg in BOOL_OPTIONS and not values:
            out += [arg, "true"]
        else:
            out += [arg, *values]
        i = j
    return out


def main(argv: list[str]) -> dict:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit_heads ablate", description=DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these options (configs/ablate.yaml).")
    parser.add_function_arguments(ablate, as_group=False)
    options = parser.instantiate_classes(parser.parse_args(normalize_argv(argv)))
    options = {name: value for name, value in options.items() if name != "config"}
    logger, failed = options.get("logger"), True
    try:
        result = ablate(**options)
        failed = False
        return result
    finally:
        # Close the W&B run whatever happens, as `lit_heads fit` does: a run left open would be adopted
        # by the next wandb.init in this process.
        if logger is not None and hasattr(logger, "finish"):
            logger.finish(exit_code=1 if failed else 0)
