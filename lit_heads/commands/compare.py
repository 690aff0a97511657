"""`lit_heads compare`: full SFT against head-restricted SFT and LoRA arms, from one config, in one report.

    lit_heads compare --config configs/compare.yaml --arms full top:0.1 random:0.1 bottom:0.1 lora:30
    lit_heads compare --config configs/compare.yaml --arms full top:8 list:heads.npy --output out/k8 \\
        --trainer.max_steps 50          # any other flag goes to every arm's `lit_heads fit`

Arms: `full` (every weight trains) or `<strategy>:<size>` with strategy top, bottom or random and
size a fraction of all heads (`0.1`, `10%`) or a count (`8`); `list:<file>` trains the heads of a
head-list file; `lora:<r>` trains LoRA adapters of rank r through PEFT (`LoRAFinetuning`) on the
attention projections, or on the named linear layers with `lora:<r>:<name>,<name>` (`--lora_targets`
sets them for every LoRA arm; `--lora_alpha`, `--lora_dropout`). Each arm is a separate `lit_heads fit`
process on the same config(s) — same seed, data and step budget — so its peak memory is its own; the
W&B runs share one group. Each arm's run folder is `<output>/<arm>`, with its resolved overrides in
`arm.yaml` and its output in `fit.log`.
The report (`<output>/report.md`, `losses.png`, `ap_change.png`, `results.json`) is written by
`lit_heads.analysis.report`.

`--config` names *fit* configs (passed on to every arm), so this command parses its own flags with
argparse rather than jsonargparse, whose `--config` would read them as compare options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml

from lit_heads.atomic import atomic_write_text
from lit_heads.errors import ConfigError, LitHeadsError
from lit_heads.heads.selection import STRATEGIES

RESTRICTED = "lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning"
LORA = "lit_heads.callbacks.lora.LoRAFinetuning"
MONITOR = "lit_heads.callbacks.head_monitor.HeadActivationMonitor"
SUMMARY = "lit_heads.callbacks.fit_summary.FitSummary"
ARM_STATS = "lit_heads.commands.compare.ArmStats"
# Callbacks whose output folder is per run: their dirpath is dropped, so they write under the arm's
# run folder (trainer.default_root_dir) and arms never overwrite each other.
_PER_RUN_CALLBACKS = {"ModelCheckpoint", "HeadActivationMonitor", "ExportHF"}


@dataclass(frozen=True)
class Arm:
    spec: str
    strategy: str | None = None  # None: full SFT
    top_k: int | None = None
    fraction: float | None = None
    heads: str | None = None
    lora_r: int | None = None  # strategy "lora"
    lora_targets: tuple[str, ...] | None = None  # None: --lora_targets, else LoRAFinetuning's default

    @property
    def slug(self) -> str:
        """Folder / run name: the spec with file-system-safe characters."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.spec.replace(":", "-")).strip("-")

    def callback(self, restricted: dict, lora: dict) -> dict | None:
        """The arm's callback spec; `restricted` and `lora` are the compare options of each kind."""
        if self.strategy is None:
            return None
        if self.strategy == "lora":
            targets = list(self.lora_targets) if self.lora_targets else lora.get("targets")
            return {"class_path": LORA, "init_args": {**lora, "r": self.lora_r, "targets": targets}}
        init = {"strategy": self.strategy, "top_k": self.top_k, "fraction": self.fraction, "heads": self.heads}
        return {"class_path": RESTRICTED, "init_args": {**init, **restricted}}


def parse_arm(spec: str) -> Arm:
    """`full`, `<top|bottom|random>:<fraction|N%|count>`, `list:<head-list file>` or `lora:<r>[:<targets>]`."""
    spec = spec.strip()
    if spec == "full":
        return Arm(spec)
    strategy, _, size = spec.partition(":")
    usage = ("Write an arm as 'full', '<strategy>:<size>' with strategy top, bottom or random and size a fraction "
             "(0.1 or 10%) or a number of heads (8), 'list:<head-list file>', or 'lora:<r>' / "
             "'lora:<r>:<module>,<module>' (LoRA of rank r, e.g. lora:8 or lora:8:q_proj,v_proj).")
    if strategy == "lora":
        return _parse_lora(spec, size, usage)
    if strategy not in STRATEGIES or not size:
        raise ConfigError(f"Cannot read arm {spec!r}. {usage}")
    if strategy == "list":
        return Arm(spec, "list", heads=size)
    try:
        if size.endswith("%"):
            return Arm(spec, strategy, fraction=float(size[:-1]) / 100)
        if "." in size or "e" in size.lower():
            return Arm(spec, strategy, fraction=float(size))
        return Arm(spec, strategy, top_k=int(size))
    except ValueError:
        raise ConfigError(f"Cannot read the size {size!r} of arm {spec!r}. {usage}") from None


def _parse_lora(spec: str, size: str, usage: str) -> Arm:
    rank, colon, targets = size.partition(":")
    try:
        r = int(rank)
    except ValueError:
        raise ConfigError(f"Cannot read the LoRA rank {rank!r} of arm {spec!r}. {usage}") from None
    names = tuple(t.strip() for t in targets.split(",")) if colon else None
    if names is not None and not all(names):
        raise ConfigError(f"Cannot read the LoRA target modules {targets!r} of arm {spec!r}. {usage}")
    return Arm(spec, "lora", lora_r=r, lora_targets=names)


def peak_rss_mb() -> float:
    """This process's own peak resident memory, MiB. Not ru_maxrss alone: Linux carries it over from
    the parent through fork and exec, so a fit started by a process that once held more memory would
    report the parent's peak. VmHWM is the high-water mark of this process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems (Linux units: KiB)


class ArmStats(L.Callback):
    """Measurements for the compare report, written to `path` (JSON) at the end of fit by rank 0:
    per-step wall times (batch start to batch end: forward, backward, optimizer step), the training
    loss (rank 0's batches) and validation loss against the number of optimizer steps done, exact
    trained and optimizer-state sizes, and peak memory (`peak_rss_mb`; CUDA peak on a GPU).

    The losses are recorded here rather than read from metrics.jsonl because Lightning logs them at
    step `global_step - 1`, which would put the last validation one step early on the plot."""

    def __init__(self, path: str):
        """
        Args:
            path: JSON file to write.
        """
        self.path = path
        self.step_times: list[float] = []
        self._started = 0.0
        self.sizes: dict[str, int] = {}
        self.train_curve: list[tuple[int, float]] = []
        self.val_curve: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._started)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train_curve.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and value is not None:
            self.val_curve.append((trainer.global_step, float(value)))

    def on_train_end(self, trainer, pl_module):
        # Before the head deltas are merged (on_fit_end): what the optimizer held is still there.
        optimizer = trainer.optimizers[0]
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        from lit_heads.callbacks.lora import LoRAFinetuning
        from lit_heads.module import model_size

        lora = next((c for c in trainer.callbacks if isinstance(c, LoRAFinetuning)), None)
        self.sizes = {
            "trainable": sum(p.numel() for p in trained),
            # Head deltas or LoRA adapters sit beside the base weights; the model's size is the base.
            "total": model_size(pl_module.model),
            "optimizer_state": sum(t.numel() for s in optimizer.state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0),
        }
        if lora is not None:
            self.sizes["lora"] = {k: lora.summary[k] for k in ("r", "alpha", "dropout", "modules", "n_modules")}

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        device = trainer.strategy.root_device
        stats = {
            **self.sizes,
            "steps": len(self.step_times),
            "step_time_median_s": statistics.median(self.step_times) if self.step_times else float("nan"),
            "step_times_s": self.step_times,
            "train_curve": self.train_curve,
            "val_curve": self.val_curve,
            "peak_rss_mb": peak_rss_mb(),
            "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
        atomic_write_text(self.path, json.dumps(stats, indent=1))


def compare(
    config: list[str],
    arms: list[str],
    output: str = "out/compare",
    name: str | None = None,
    kv: str = "group",
    n_score_samples: int = 32,
    seed: int = 0,
    fit_args: list[str] | None = None,
    lora_targets: list[str] | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
) -> Path:
    """Run every arm as a `lit_heads fit`, then write the report. Returns the report path."""
    from lit_heads.analysis.report import format_accuracy, load_arm, markdown_table, write_report

    if not config:
        raise ConfigError("lit_heads compare needs --config: the fit config every arm is trained with (e.g. "
                          "configs/compare.yaml).")
    parsed = [parse_arm(a) for a in arms]
    if not parsed:
        raise ConfigError("lit_heads compare needs --arms, e.g. --arms full top:0.1 random:0.1 bottom:0.1.")
    slugs = [a.slug for a in parsed]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"The arms {arms} repeat one another; give each arm once.")
    owned = [a for a in fit_args or [] if a.startswith(("--trainer.callbacks", "--trainer.logger",
                                                        "--trainer.default_root_dir"))]
    if owned:
        raise ConfigError(
            f"lit_heads compare sets each arm's callbacks, logger and run folder itself, so {owned[0]} would be "
            "overridden per arm or break the report. Put shared callbacks in the --config file instead."
        )
    out = Path(output).resolve()
    group = name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    base = _read_configs(config)
    options = {"kv": kv, "n_score_samples": n_score_samples, "seed": seed}
    lora_options = {"alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets}
    # Checked here, before any arm runs, instead of failing in the second arm's fit.
    from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning
    from lit_heads.callbacks.lora import LoRAFinetuning

    lora_arms = []
    for arm in parsed:
        spec = arm.callback(options, lora_options)
        if spec is not None and spec["class_path"] == LORA:
            lora_arms.append(LoRAFinetuning(**spec["init_args"]))
        elif spec is not None:
            HeadRestrictedFinetuning(**spec["init_args"])
    if any(c.targets is not None for c in lora_arms):
        _check_lora_targets(_model_name(config, fit_args or []), lora_arms)

    results = []
    for n, arm in enumerate(parsed, start=1):
        arm_dir = _fresh_dir(out / arm.slug)
        overrides = arm_dir / "arm.yaml"
        arm_config = _arm_config(base, arm, arm_dir, group, options, lora_options)
        overrides.write_text(yaml.safe_dump(arm_config, sort_keys=False))
        command = [sys.executable, "-m", "lit_heads.cli", "fit", *[a for c in config for a in ("--config", c)],
                   "--config", str(overrides), *(fit_args or [])]
        print(f"[{n}/{len(parsed)}] {arm.spec}: lit_heads fit ... (log: {arm_dir / 'fit.log'})", flush=True)
        seconds = _run_fit(command, arm_dir)
        result = load_arm(arm_dir, arm.spec, wall_s=seconds)
        acc = "" if result.val_acc_n is None else f", val acc {format_accuracy(result)}"
        print(f"      done in {seconds:.0f} s: {result.trainable:,} trainable, val loss {result.val_loss_before:.4f} "
              f"-> {result.val_loss:.4f}{acc}, step {result.step_time_s:.3f} s", flush=True)
        results.append(result)

    shown = " ".join(shlex.quote(a) for a in ["lit_heads", "compare", *sum((["--config", c] for c in config), []),
                                              "--arms", *arms, "--output", output, *(fit_args or [])])
    report = write_report(results, out, command=shown,
                          notes=[f"W&B group: `{group}` (one run per arm, named by the arm)."])
    print("\n" + markdown_table(results) + f"\n\nreport: {report}", flush=True)
    return report


def _read_configs(paths: list[str]) -> dict:
    """The `trainer.callbacks` and `trainer.logger` the fit will see: LightningCLI replaces lists and
    subclass specs wholesale, so the last config that sets one wins."""
    merged: dict = {"callbacks": [], "logger": None}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"Config file {path} does not exist. Give the fit config the arms share, e.g. "
                              "configs/compare.yaml.")
        trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        for key in ("callbacks", "logger"):
            if key in trainer:
                merged[key] = trainer[key]
    return merged


def _arm_config(base: dict, arm: Arm, arm_dir: Path, group: str, options: dict, lora_options: dict) -> dict:
    """The per-arm overrides: the shared callbacks with per-run folders moved into the arm folder,
    the arm's head restriction or LoRA, the measurement callback, and a logger grouped by the comparison."""
    callbacks = []
    for entry in base["callbacks"] or []:
        spec = {"class_path": entry} if isinstance(entry, str) else {**entry,
                                                                     "init_args": dict(entry.get("init_args") or {})}
        short = spec["class_path"].rsplit(".", 1)[-1]
        if short in ("HeadRestrictedFinetuning", "LoRAFinetuning"):
            continue  # the arm decides what trains
        if short in _PER_RUN_CALLBACKS:
            spec["init_args"].pop("dirpath", None)
        callbacks.append(spec)
    shorts = {c["class_path"].rsplit(".", 1)[-1] for c in callbacks}
    # The report reads these files; every arm has them even when the shared config does not.
    if "HeadActivationMonitor" not in shorts:
        callbacks.append({"class_path": MONITOR})
    if "FitSummary" not in shorts:
        callbacks.append({"class_path": SUMMARY})
    trains = arm.callback(options, lora_options)
    if trains:
        callbacks.append(trains)
    callbacks.append({"class_path": ARM_STATS, "init_args": {"path": str(arm_dir / "arm_stats.json")}})

    logger = base["logger"] if isinstance(base["logger"], dict) else {}
    logger_args = dict(logger.get("init_args") or {}) if logger.get("class_path", "").endswith("WandbLogger") else {}
    # save_dir null, not absent: a later config merges into the shared config's logger arguments, and
    # null lets `lit_heads fit` point it at the arm's run folder like every other output.
    logger_args.update(save_dir=None, name=arm.spec, group=group)
    return {"trainer": {
        "default_root_dir": str(arm_dir),
        "logger": {"class_path": "lit_heads.loggers.WandbLogger", "init_args": logger_args},
        "callbacks": callbacks,
    }}


def _model_name(configs: list[str], fit_args: list[str]) -> str:
    """The `model.model` the arms' fits will load: the last config that sets it, then `--model.model`."""
    from lit_heads.models import DEFAULT_MODEL

    name = DEFAULT_MODEL
    for path in configs:
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model")
        if isinstance(model, dict) and model.get("model"):
            name = str(model["model"])
    for i, arg in enumerate(fit_args):
        if arg == "--model.model" and i + 1 < len(fit_args):
            name = fit_args[i + 1]
        elif arg.startswith("--model.model="):
            name = arg.split("=", 1)[1]
    return name


def _check_lora_targets(model_name: str, callbacks: list) -> None:
    """Named LoRA targets must be linear layers of the model: checked on a weightless copy built from
    the model's config (meta device), before any arm trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_heads.callbacks.lora import resolve_targets
    from lit_heads.models import resolve

    try:
        config = AutoConfig.from_pretrained(resolve(model_name).path)
    except OSError:
        return  # not readable here (e.g. a hub id offline): the arm's own fit reports it
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for callback in callbacks:
        resolve_targets(skeleton, callback.targets)


def _fresh_dir(path: Path) -> Path:
    """An empty arm folder. A folder from an earlier compare (it has arm.yaml) is replaced, since
    metrics.jsonl is appended to and would mix two runs; anything else is left alone."""
    if path.exists():
        if not (path / "arm.yaml").is_file() and any(path.iterdir()):
            raise ConfigError(f"{path} exists and was not written by `lit_heads compare`. Choose another --output.")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _run_fit(command: list[str], arm_dir: Path) -> float:
    """Run one arm, printing its progress (step and train loss, read from metrics.jsonl)."""
    started = time.perf_counter()
    metrics = arm_dir / "metrics.jsonl"
    shown = None
    with open(arm_dir / "fit.log", "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while process.poll() is None:
            time.sleep(2)
            last = _last_train_loss(metrics)
            if last and last != shown:
                # Lightning logs training metrics at global_step - 1: +1 shows the steps done.
                print(f"      step {last[0] + 1:>5}  train/loss {last[1]:.4f}  ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                shown = last
    if process.returncode != 0:
        tail = "".join((arm_dir / "fit.log").read_text().splitlines(keepends=True)[-25:])
        raise LitHeadsError(
            f"The fit of arm {arm_dir.name} failed with exit status {process.returncode}; its last output lines are "
            f"below and the whole log is {arm_dir / 'fit.log'}. Fix the cause and rerun; finished arms are re-run "
            f"too.\n{tail}"
        )
    return time.perf_counter() - started


def _last_train_loss(metrics: Path) -> tuple[int, float] | None:
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            continue
        if "train/loss" in row:
            last = (int(row["step"]), float(row["train/loss"]))
    return last


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lit_heads compare", allow_abbrev=False,  # no prefix matching: unknown flags go to `lit_heads fit`
        description=__doc__.split("\n\n")[0] + " Flags not listed here are passed on to every arm's `lit_heads fit`.",
    )
    parser.add_argument("--config", action="append", required=True,
                        help="fit config shared by every arm; repeat to stack configs")
    parser.add_argument("--arms", nargs="+", default=["full", "top:0.1", "random:0.1", "bottom:0.1"],
                        help="arms: full, <top|bottom|random>:<fraction|N%%|count>, list:<file>, "
                             "lora:<r>[:<module>,...] (default: %(default)s)")
    parser.add_argument("--output", default="out/compare",
                        help="report folder; arm runs go to <output>/<arm> (default: %(default)s)")
    parser.add_argument("--name", default=None, help="W&B group of the arms' runs (default: compare-<date-time>)")
    parser.add_argument("--kv", default="group", choices=["group", "none"],
                        help="GQA key/value policy of restricted arms")
    parser.add_argument("--n_score_samples", type=int, default=32,
                        help="training examples that rank heads by AP (top/bottom arms)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random arms")
    parser.add_argument("--lora_targets", default=None,
                        help="linear layers LoRA arms adapt, comma-separated (q_proj,v_proj) or all-linear; an "
                             "arm's own lora:<r>:<modules> wins (default: every linear layer of the attention modules)")
    parser.add_argument("--lora_alpha", type=float, default=None,
                        help="LoRA scale alpha (update x alpha / r; default 2 r)")
    parser.add_argument("--lora_dropout", type=float, default=0.0,
                        help="dropout on the LoRA adapters' input (default: %(default)s)")
    args, fit_args = parser.parse_known_args(argv)
    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets is not None else None
    compare(args.config, args.arms, args.output, args.name, args.kv, args.n_score_samples, args.seed, fit_args,
            targets, args.lora_alpha, args.lora_dropout)
