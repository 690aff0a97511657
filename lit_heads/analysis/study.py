"""The paper's study end to end (Zhao et al., arXiv 2409.15820), on one model, in one process.

    Finding 1  SFT selectively activates task-specific heads: AP of every task before and after a
               short SFT on that task; between-task similarity of the pattern *changes* next to the
               within-task similarity of two disjoint halves of the same task's samples (the noise
               floor); Gini and CV before and after.
    Finding 2  ΔAP_complex ≈ Σ α_i ΔAP_basic_i (least squares and NNLS), R², residual; control: the
               same fit with a basic task that is *not* part of the composite swapped in.
    Finding 3  pattern change over the steps of the complex task's SFT (MSE and correlation against
               the final pattern); SFT of only the top-k heads (by ΔAP) against full SFT, with a
               random-k control.
    Application  α → a mix of basic-task data, then the scarce complex data (two-stage SFT), against
               complex-only SFT and a random mix of the same size, at the same step budget, over seeds.

Everything here reuses the library: `SFTModule` (loss, generation), `SFTDataModule` (encoding),
`compute_ap`, `stats`, `fit_composition`, `build_mix`, `HeadRestriction`. The model is loaded once;
every arm starts from a CPU copy of the base weights, which is far cheaper than reloading.

A pattern is measured on a task's *held-out* samples (never trained on), split into two disjoint
halves A and B; the task's pattern is the mean of the two. Every between-task similarity is taken
half-against-half as well (A of task i with B of task j), so the diagonal (A_i vs B_i) and the
off-diagonal entries rest on exactly the same amount of data: an off-diagonal value near the
diagonal means "not task-specific", one well below it means "task-specific beyond sampling noise".
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lit_heads.data.records import Example
from lit_heads.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The paper's numbers, quoted in the report next to ours (see DESIGN.md).
PAPER = {
    "r2": {"math-with-code ≈ math + code": 0.97, "instruction mix ≈ reasoning + programming": 0.95},
    "gini_llama3": {"before": 0.50, "after": 0.33},
    "application_math_benchmark": {
        "columns": ["Base", "SFT", "random mix first", "AP-guided mix first"],
        "Llama-7B": [28.68, 31.78, 33.82, 36.82],
        "Llama2-7B": [29.07, 34.50, 36.75, 38.50],
        "Llama3-8B": [46.12, 49.22, 50.10, 52.33],
    },
    "pattern_change": "patterns change most in the first ~200 steps",
}

ARMS = ("base", "complex_only", "random_mix", "ap_mix")
REAL_TASKS = {"gsm8k": "basic", "humaneval": "basic", "gsm8k_python": "complex"}
REAL_COMPONENTS = ("gsm8k", "humaneval")


@dataclass
class StudyConfig:
    """The whole study's settings (configs/study.yaml is the default profile, study_quick.yaml the CI one).

    Args:
        model: bundled short name, HF directory, .gguf file or hub id.
        output: folder for report.md, results.json, figures/, patterns/ and mix/.
        seed: seed of data generation, Finding 1-3 training and the held-out split.
        basic_tasks: generated basic tasks; those not in the complex task's components are controls.
        complex_task: generated complex task (its components come from its task definition).
        real_data: 'auto' (use the real tasks when `shared_data` exists), 'on' or 'off'.
        shared_data: folder holding gsm8k/ and humaneval/ (see ../shared/data/README.md).
        max_length: tokens per generated-task sample.
        batch_size: SFT batch size.
        lr: AdamW learning rate of full SFT (weight decay 0.01, warmup + cosine per training run).
        warmup_steps: linear warmup steps of every training run.
        ap_samples: held-out samples per task the pattern is measured on (two halves of this).
        ap_batch_size: batch size of pattern scoring.
        sft_steps: SFT steps per task for Findings 1-3 (one pass over sft_steps * batch_size samples).
        top_k: k of the top-k head overlap (Jaccard) similarity.
        track_every: record the complex task's pattern every this many steps of its SFT (Finding 3).
        track_samples: held-out samples of that tracked pattern.
        restricted_top_k: heads trained in the head-restricted arm (top by the complex task's ΔAP).
        restricted_lr: learning rate of head-restricted SFT (few parameters train, so higher).
        restricted_random: also train k random heads, the control for the top-k choice.
        eval_samples: held-out complex-task samples whose greedy answers are graded.
        max_new_tokens: generation budget per graded answer.
        complex_train_size: the scarce complex-task training set of the application.
        mix_steps: steps of the first (mix) stage of the application.
        complex_steps: steps of the second (complex data) stage; complex-only SFT gets both budgets.
        mix_size: basic-task samples in a mix; null = mix_steps * batch_size (one pass).
        mix_method: fit whose α makes the mix: 'nnls' (α ≥ 0) or 'lstsq'.
        mix_rule: what happens to negative α ('clip' drops them, 'abs' uses |α|); see analysis/mix.py.
        seeds: seeds of the application's arms (spread over seeds is reported).
        real_sft_steps: SFT steps per real task.
        real_ap_samples: held-out samples per real task for its pattern.
        real_max_length: tokens per real-task sample (longer responses are cut; longer prompts dropped).
        real_train_size: real-task training samples loaded (GSM8K-as-Python rows are run in the sandbox).
        sec_per_step: planning estimate of one SFT step at max_length (for the printed ETA).
        sec_per_ap_sample: planning estimate of scoring one sample's pattern.
        sec_per_gen_sample: planning estimate of generating and grading one answer.
        progress_bar: show Lightning's progress bar while training.
    """

    model: str = "smollm2-135m"
    output: str = "runs/study"
    seed: int = 42
    basic_tasks: list[str] = field(default_factory=lambda: ["arithmetic", "code", "string"])
    complex_task: str = "math_code"
    real_data: str = "auto"
    shared_data: str = "../shared/data"
    max_length: int = 160
    batch_size: int = 4
    lr: float = 3e-4
    warmup_steps: int = 5
    ap_samples: int = 32
    ap_batch_size: int = 8
    sft_steps: int = 40
    top_k: int = 20
    track_every: int = 5
    track_samples: int = 16
    restricted_top_k: int = 27
    restricted_lr: float = 2e-3
    restricted_random: bool = True
    eval_samples: int = 32
    max_new_tokens: int = 48
    complex_train_size: int = 32
    mix_steps: int = 25
    complex_steps: int = 25
    mix_size: int | None = None
    mix_method: str = "nnls"
    mix_rule: str = "clip"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    real_sft_steps: int = 12
    real_ap_samples: int = 16
    real_max_length: int = 320
    real_train_size: int = 64
    sec_per_step: float = 3.0
    sec_per_ap_sample: float = 0.4
    sec_per_gen_sample: float = 0.5
    progress_bar: bool = True

    def validate(self) -> "StudyConfig":
        from lit_heads.analysis.compose import METHODS
        from lit_heads.analysis.mix import RULES
        from lit_heads.data.tasks import get_task

        complex_spec = get_task(self.complex_task)
        if complex_spec.kind != "complex":
            raise ConfigError(f"complex_task {self.complex_task!r} is a {complex_spec.kind} task; use a complex one (math_code).")
        for name in self.basic_tasks:
            if get_task(name).kind != "basic":
                raise ConfigError(f"basic_tasks lists {name!r}, which is not a basic task.")
        missing = [c for c in complex_spec.components if c not in self.basic_tasks]
        if missing:
            raise ConfigError(
                f"{self.complex_task} is made of {list(complex_spec.components)}, but basic_tasks {self.basic_tasks} lacks "
                f"{missing}; the composition needs every component."
            )
        if self.real_data not in ("auto", "on", "off"):
            raise ConfigError(f"real_data={self.real_data!r}; use 'auto', 'on' or 'off'.")
        if self.mix_method not in METHODS or self.mix_rule not in RULES:
            raise ConfigError(f"mix_method must be one of {METHODS} and mix_rule one of {RULES}; got {self.mix_method!r}, {self.mix_rule!r}.")
        if not self.seeds:
            raise ConfigError("seeds is empty; the application needs at least one seed (three for a spread).")
        counts = dict(ap_samples=self.ap_samples, track_samples=self.track_samples, real_ap_samples=self.real_ap_samples)
        small = {k: v for k, v in counts.items() if v < 2}
        if small:
            raise ConfigError(f"{small}: a pattern needs at least 2 samples (two disjoint halves).")
        positive = dict(sft_steps=self.sft_steps, mix_steps=self.mix_steps, complex_steps=self.complex_steps,
                        eval_samples=self.eval_samples, complex_train_size=self.complex_train_size,
                        batch_size=self.batch_size, track_every=self.track_every, real_sft_steps=self.real_sft_steps)
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ConfigError(f"{bad}: these must be >= 1.")
        return self

    @property
    def components(self) -> list[str]:
        from lit_heads.data.tasks import get_task

        return list(get_task(self.complex_task).components)

    @property
    def controls(self) -> list[str]:
        return [t for t in self.basic_tasks if t not in self.components]

    @property
    def n_mix(self) -> int:
        return self.mix_size if self.mix_size is not None else self.mix_steps * self.batch_size

    def use_real(self) -> bool:
        present = (Path(self.shared_data) / "gsm8k" / "train.jsonl").is_file() and (Path(self.shared_data) / "humaneval" / "HumanEval.jsonl").is_file()
        if self.real_data == "on" and not present:
            raise DataError(f"real_data: on, but {self.shared_data} has no gsm8k/train.jsonl and humaneval/HumanEval.jsonl; set real_data: auto or off.")
        return self.real_data == "on" or (self.real_data == "auto" and present)


@dataclass
class Task:
    name: str
    kind: str  # basic | complex
    train: list[Example]
    heldout: list[Example]


# ------------------------------------------------------------------------------------------------ budget


def plan_budget(cfg: StudyConfig, real: bool) -> dict[str, float]:
    """Planned work and the estimated seconds it takes, from the per-unit estimates of the config."""
    n_tasks = len(cfg.basic_tasks) + 1
    restricted_runs = 1 + int(cfg.restricted_random)
    n_track = cfg.sft_steps // cfg.track_every + 2
    steps = n_tasks * cfg.sft_steps + restricted_runs * cfg.sft_steps + 3 * len(cfg.seeds) * (cfg.mix_steps + cfg.complex_steps)
    ap = (2 * n_tasks + restricted_runs) * cfg.ap_samples + n_track * cfg.track_samples
    gen = cfg.eval_samples * (2 + restricted_runs + 3 * len(cfg.seeds))
    # Real samples are ~2.5x longer than generated ones, and cost grows with length.
    length = 2.5 * cfg.real_max_length / 320
    real_steps = 3 * cfg.real_sft_steps * length if real else 0
    real_ap = 6 * cfg.real_ap_samples * length if real else 0
    seconds = (steps + real_steps) * cfg.sec_per_step + (ap + real_ap) * cfg.sec_per_ap_sample + gen * cfg.sec_per_gen_sample
    return {"sft_steps": steps, "real_sft_steps": cfg.real_sft_steps * 3 if real else 0, "ap_samples": ap,
            "real_ap_samples": 6 * cfg.real_ap_samples if real else 0, "generated_answers": gen, "eta_s": round(seconds)}


class Clock:
    """Elapsed time per stage, printed as the study goes (a 60-minute job must say where it is)."""

    def __init__(self, eta_s: float):
        self.start = time.perf_counter()
        self.eta_s = eta_s
        self.stages: dict[str, float] = {}
        self._last = self.start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._last, 1)
        self._last = now
        print(f"[study] {stage} done in {self.stages[stage]:.0f} s; {now - self.start:.0f} s of ~{self.eta_s:.0f} s planned", flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


# ------------------------------------------------------------------------------------------------ data


def generated_tasks(cfg: StudyConfig) -> dict[str, Task]:
    """Each generated task's stream: the first samples are held out (patterns, grading), the rest train
    (Finding 1 SFT, the mix pools, the scarce complex set), so the two never share a prompt."""
    from lit_heads.data import generate_task, get_task

    n_heldout = max(cfg.ap_samples, cfg.eval_samples, cfg.track_samples)
    n_train = max(cfg.sft_steps * cfg.batch_size, cfg.n_mix, cfg.complex_train_size)
    tasks = {}
    for name in [*cfg.basic_tasks, cfg.complex_task]:
        examples = generate_task(name, n_heldout + n_train, cfg.seed)
        tasks[name] = Task(name, get_task(name).kind, examples[n_heldout:], examples[:n_heldout])
    return tasks


def real_tasks(cfg: StudyConfig, encoder) -> dict[str, Task]:
    """GSM8K (math), HumanEval (code) and GSM8K-as-Python (their composite), each with a train part and
    a held-out part (GSM8K: train/test files; HumanEval: a seeded half/half split of its 164 problems).
    Samples whose prompt leaves under 32 tokens of room at real_max_length are dropped, not cut."""
    from lit_heads.data import load_examples
    from lit_heads.data.gsm8k_python import load_gsm8k_python, load_humaneval

    root = Path(cfg.shared_data)
    need_train, need_heldout = cfg.real_train_size, cfg.real_ap_samples

    def fits(examples: list[Example]) -> list[Example]:
        return [e for e in examples if len(encoder.prompt_ids(e)) <= cfg.real_max_length - 32]

    def take(examples: list[Example], n: int, what: str) -> list[Example]:
        kept = fits(examples)
        if len(kept) < n:
            raise DataError(f"{what}: only {len(kept)} samples fit real_max_length={cfg.real_max_length}, {n} needed; raise real_max_length.")
        return kept[:n]

    # The composite reads the first rows of each GSM8K file (about 90% rewrite into programs) and the
    # math task the rows after them, so the two never share a question.
    py_rows_train, py_rows_test = 3 * need_train, 3 * need_heldout
    py_train, _ = load_gsm8k_python(root / "gsm8k" / "train.jsonl", limit=py_rows_train)
    py_test, _ = load_gsm8k_python(root / "gsm8k" / "test.jsonl", limit=py_rows_test)
    rng = random.Random(cfg.seed)
    gsm_train = load_examples(root / "gsm8k" / "train.jsonl")[py_rows_train:]
    gsm_test = load_examples(root / "gsm8k" / "test.jsonl")[py_rows_test:]
    rng.shuffle(gsm_train)
    humaneval = load_humaneval(root / "humaneval" / "HumanEval.jsonl")
    rng.shuffle(humaneval)
    half = len(humaneval) // 2
    return {
        "gsm8k": Task("gsm8k", "basic", take(gsm_train, need_train, "gsm8k train"), take(gsm_test, need_heldout, "gsm8k test")),
        "humaneval": Task("humaneval", "basic", take(humaneval[half:], need_train, "humaneval train"),
                          take(humaneval[:half], need_heldout, "humaneval held-out")),
        "gsm8k_python": Task("gsm8k_python", "complex", take(py_train, need_train, "GSM8K-as-Python train"),
                             take(py_test, need_heldout, "GSM8K-as-Python test")),
    }


# ------------------------------------------------------------------------------------------------ the runner


class StudyRunner:
    """The model, its base weights and the training/measuring primitives every stage uses."""

    def __init__(self, cfg: StudyConfig):
        from lit_heads.data import SFTDataModule
        from lit_heads.heads import find_heads
        from lit_heads.module import SFTModule

        self.cfg = cfg
        self.module = SFTModule(cfg.model, num_generate=0, max_new_tokens=cfg.max_new_tokens)
        # A CPU copy of the base weights: every arm restarts from it with load_state_dict.
        self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.model.state_dict().items()}
        self.data = SFTDataModule(tokenizer=self.module.tokenizer, max_length=cfg.max_length, batch_size=cfg.batch_size, seed=cfg.seed)
        self.ap_data = SFTDataModule(tokenizer=self.module.tokenizer, max_length=cfg.max_length, batch_size=cfg.ap_batch_size)
        layout = find_heads(self.module.model)
        self.n_layers, self.n_heads = layout.n_layers, layout.n_heads

    def reset(self) -> None:
        self.module.model.load_state_dict(self.base_state)

    def train(self, examples: list[Example], steps: int, seed: int, lr: float | None = None, callbacks: list | None = None,
              data=None) -> float:
        """`steps` AdamW steps (warmup + cosine) on `examples`, reshuffled every pass; returns seconds."""
        from lit_heads.optim import WarmupCosine

        if not examples:
            raise DataError("A training run got no examples.")
        data = data or self.data
        L.seed_everything(seed, verbose=False)
        data.seed = seed  # the loader's shuffle generator is seeded from the datamodule
        loader = data.make_dataloader(examples, shuffle=True)
        self.module.optimizer_factory = partial(torch.optim.AdamW, lr=lr or self.cfg.lr, weight_decay=0.01)
        self.module.scheduler_factory = partial(WarmupCosine, warmup_steps=min(self.cfg.warmup_steps, max(steps - 1, 0)))
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=self.cfg.progress_bar, gradient_clip_val=1.0,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks or [],
        )
        started = time.perf_counter()
        trainer.fit(self.module, train_dataloaders=loader)
        return time.perf_counter() - started

    def halves(self, examples: list[Example], data=None) -> dict[str, torch.Tensor]:
        """Patterns of two disjoint halves of `examples` (even and odd positions) and of all of them."""
        from lit_heads.heads.scoring import compute_ap

        data = data or self.ap_data
        a, b = examples[0::2], examples[1::2]
        pa = compute_ap(self.module.model, data.make_dataloader(a), progress=False).scores
        pb = compute_ap(self.module.model, data.make_dataloader(b), progress=False).scores
        # AP is a per-sample mean, so the whole set's AP is the size-weighted mean of the halves'.
        full = (pa * len(a) + pb * len(b)) / len(examples)
        return {"a": pa, "b": pb, "full": full}

    def accuracy(self, examples: list[Example]) -> float:
        """Share of greedy answers the task's checker accepts."""
        from lit_heads.data import is_correct

        answers = self.module.generate([self.data.render_prompt_ids(e) for e in examples])
        return sum(is_correct(e, a) for e, a in zip(examples, answers)) / len(examples)


class PatternTracker(L.Callback):
    """Records the pattern on fixed probe batches at step 0, every `every` steps and at the last step
    (Finding 3: how fast the pattern moves)."""

    def __init__(self, probe: list[dict], every: int):
        from lit_heads.heads.history import PatternHistory

        self.probe, self.every, self.history = probe, every, PatternHistory()

    def _record(self, trainer, pl_module) -> None:
        from lit_heads.heads.scoring import compute_ap

        if self.history.steps and self.history.steps[-1] == trainer.global_step:
            return
        self.history.append(trainer.global_step, compute_ap(pl_module.model, self.probe, progress=False).scores)

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, pl_module)


# ------------------------------------------------------------------------------------------------ analysis helpers


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
    per_task = {n: {"within": float(m[i, i]), "between_mean": float(np.mean(m[i][off[i]])) if len(names) > 1 else math.nan}
                for i, n in enumerate(names)}
    return {"within_mean": float(np.mean(np.diag(m))), "between_mean": float(np.mean(m[off])) if len(names) > 1 else math.nan,
            "per_task": per_task}


def delta_halves(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: after[k] - before[k] for k in ("a", "b", "full")}


def fit_dict(fit) -> dict[str, Any]:
    return {"alpha": fit.alpha, "r2": fit.r2, "method": fit.method}


def composition(target: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]], components: list[str],
                controls: list[str]) -> dict[str, Any]:
    """Finding 2 on ΔAP: the main fit (lstsq and NNLS), every component swapped for every control task,
    all basic tasks together, and the noise ceiling (half A of the target fitted by its half B)."""
    from lit_heads.analysis.compose import fit_composition

    def fits(names: list[str]) -> dict[str, Any]:
        bases = {n: deltas[n]["full"] for n in names}
        return {m: fit_composition(target["full"], bases, method=m) for m in ("lstsq", "nnls")}

    main = fits(components)
    out: dict[str, Any] = {"components": components, "main": {m: fit_dict(f) for m, f in main.items()},
                           "residual": main["lstsq"].residual.tolist(), "controls": {}}
    for control in controls:
        for swapped in components:
            names = [control if c == swapped else c for c in components]
            out["controls"][f"{'+'.join(names)} ({control} instead of {swapped})"] = {m: fit_dict(f) for m, f in fits(names).items()}
        out["controls"][f"{control} alone"] = {m: fit_dict(f) for m, f in fits([control]).items()}
    all_basic = [n for n in deltas if n in components or n in controls]
    if len(all_basic) > len(components):
        out["all_basic"] = {m: fit_dict(f) for m, f in fits(all_basic).items()}
    out["noise_ceiling_r2"] = fit_composition(target["a"], {"half_b": target["b"]}).r2
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


def mean_std(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "values": list(map(float, values))}


# ------------------------------------------------------------------------------------------------ stages


def finding1(runner: StudyRunner, tasks: dict[str, Task], steps: int, ap_samples: int, data=None, ap_data=None,
             track: Task | None = None, patterns_dir: Path | None = None) -> dict[str, Any]:
    """AP before and after SFT on each task; similarities (ΔAP and after-SFT AP) with the half-split
    noise floor; concentration before and after. Returns results plus the raw patterns under '_raw'."""
    from lit_heads.heads import stats
    from lit_heads.heads.pattern import Pattern

    cfg = runner.cfg
    runner.reset()
    before = {n: runner.halves(t.heldout[:ap_samples], ap_data) for n, t in tasks.items()}
    after, deltas, seconds, tracked, full_sft_accuracy = {}, {}, {}, None, None
    for name, task in tasks.items():
        runner.reset()
        callbacks = []
        if track is not None and name == track.name:
            probe = list((ap_data or runner.ap_data).make_dataloader(track.heldout[: cfg.track_samples]))
            callbacks = [PatternTracker(probe, cfg.track_every)]
        print(f"[study] SFT on {name}: {steps} steps", flush=True)
        seconds[name] = runner.train(task.train[: steps * cfg.batch_size], steps, cfg.seed, callbacks=callbacks, data=data)
        after[name] = runner.halves(task.heldout[:ap_samples], ap_data)
        deltas[name] = delta_halves(before[name], after[name])
        if callbacks:
            tracked = callbacks[0].history
        if track is not None and name == track.name:
            # The model is the complex task's full-SFT model right now: grade it before the next reset.
            full_sft_accuracy = runner.accuracy(track.heldout[: cfg.eval_samples])
        if patterns_dir is not None:
            for when, pats in (("before", before[name]), ("after", after[name]), ("delta", deltas[name])):
                Pattern(pats["full"], {"model": cfg.model, "data": name, "kind": when}).save(patterns_dir / f"{name}_{when}.safetensors")
    k = min(cfg.top_k, runner.n_layers * runner.n_heads)
    names = list(tasks)
    sims = {}
    for which, source in (("delta", deltas), ("after", after)):
        for metric_name, metric in (("corr", stats.pearson), ("topk_jaccard", partial(stats.topk_jaccard, k=k))):
            matrix = similarity(source, metric)
            sims[f"{which}_{metric_name}"] = {"matrix": matrix, **specificity(matrix, names)}
    result = {
        "tasks": names, "kinds": {n: t.kind for n, t in tasks.items()}, "top_k": k, "sft_steps": steps,
        "ap_samples": ap_samples, "train_seconds": seconds,
        "concentration": {n: {"before": concentration(before[n]["full"]), "after": concentration(after[n]["full"])} for n in names},
        "similarity": sims,
        "full_sft_accuracy": full_sft_accuracy,
        "_raw": {"before": before, "after": after, "delta": deltas, "tracked": tracked},
    }
    return result


def finding3_restricted(runner: StudyRunner, complex_task: Task, full_delta: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Only k heads train (top-k by the complex task's full-SFT ΔAP, and k random heads): how much of
    the full-SFT pattern change and accuracy do they reproduce?"""
    from lit_heads.heads import stats
    from lit_heads.heads.restrict import HeadRestriction
    from lit_heads.heads.selection import select_heads

    cfg = runner.cfg
    k = min(cfg.restricted_top_k, runner.n_layers * runner.n_heads)
    arms = {"top": select_heads("top", runner.n_layers, runner.n_heads, top_k=k, scores=full_delta["full"])}
    if cfg.restricted_random:
        arms["random"] = select_heads("random", runner.n_layers, runner.n_heads, top_k=k, seed=cfg.seed)
    out: dict[str, Any] = {"k": k, "lr": cfg.restricted_lr, "arms": {}}
    for arm, heads in arms.items():
        runner.reset()
        restriction = HeadRestriction(runner.module.model, heads).apply()
        described = restriction.describe()
        print(f"[study] head-restricted SFT ({arm} {k} heads, {described['fraction']:.2%} of parameters)", flush=True)
        runner.train(complex_task.train[: cfg.sft_steps * cfg.batch_size], cfg.sft_steps, cfg.seed, lr=cfg.restricted_lr)
        restriction.merge()
        after = runner.halves(complex_task.heldout[: cfg.ap_samples])
        delta = after["full"] - before["full"]
        out["arms"][arm] = {
            "heads": [list(h) for h in heads], "trainable_fraction": described["fraction"],
            "corr_delta_vs_full": stats.pearson(delta, full_delta["full"]), "mse_delta_vs_full": stats.mse(delta, full_delta["full"]),
            "delta_norm_ratio": float(delta.norm() / full_delta["full"].norm()),
            "accuracy": runner.accuracy(complex_task.heldout[: cfg.eval_samples]),
        }
    return out


def application(runner: StudyRunner, tasks: dict[str, Task], alpha: dict[str, float], mix_dir: Path) -> dict[str, Any]:
    """Two-stage SFT over seeds: complex-only (all steps on the complex data), random mix then complex,
    AP-guided mix then complex; the same total steps for every arm, graded on the complex held-out part."""
    from lit_heads.analysis.mix import build_mix, mix_counts, write_jsonl

    cfg = runner.cfg
    complex_task = tasks[cfg.complex_task]
    scarce = complex_task.train[: cfg.complex_train_size]
    evaluation = complex_task.heldout[: cfg.eval_samples]
    pools = {t: tasks[t].train for t in cfg.basic_tasks}
    union = [e for t in cfg.basic_tasks for e in pools[t]]
    n = cfg.n_mix
    accuracies: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
    random_counts = []
    for seed in cfg.seeds:
        guided = build_mix(alpha, pools, n, seed=seed, rule=cfg.mix_rule)
        # The random mix draws uniformly from all basic-task data, so its task shares are whatever chance gives.
        mixed = random.Random(seed).sample(union, n)
        random_counts.append({t: sum(e.task == t for e in mixed) for t in cfg.basic_tasks})
        if seed == cfg.seeds[0]:
            write_jsonl(guided, mix_dir / "ap_mix.jsonl")
            write_jsonl(mixed, mix_dir / "random_mix.jsonl")
        for arm in ARMS[1:]:
            runner.reset()
            print(f"[study] application seed {seed}: {arm}", flush=True)
            if arm == "complex_only":
                runner.train(scarce, cfg.mix_steps + cfg.complex_steps, seed)
            else:
                runner.train(guided if arm == "ap_mix" else mixed, cfg.mix_steps, seed)
                runner.train(scarce, cfg.complex_steps, seed)
            accuracies[arm].append(runner.accuracy(evaluation))
    return {
        "alpha": alpha, "rule": cfg.mix_rule, "n_mix": n, "ap_mix_counts": mix_counts(alpha, n, cfg.mix_rule),
        "random_mix_counts": random_counts, "complex_train_size": len(scarce), "eval_samples": len(evaluation),
        "steps": {"mix": cfg.mix_steps, "complex": cfg.complex_steps, "complex_only": cfg.mix_steps + cfg.complex_steps},
        "seeds": list(cfg.seeds), "accuracy": {arm: mean_std(v) for arm, v in accuracies.items()},
    }


# ------------------------------------------------------------------------------------------------ the study


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run everything and write report.md, results.json, figures/, patterns/ and mix/ under cfg.output."""
    from lit_heads.analysis.study_report import write_report

    cfg.validate()
    out = Path(cfg.output)
    for sub in ("figures", "patterns", "mix"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    real = cfg.use_real()
    budget = plan_budget(cfg, real)
    print(f"[study] plan: {budget['sft_steps']} SFT steps, {budget['ap_samples']} pattern samples, "
          f"{budget['generated_answers']} graded answers" + (f", real tasks {budget['real_sft_steps']} steps" if real else "")
          + f"; estimated {budget['eta_s'] / 60:.1f} min on this machine's assumed speed ({cfg.sec_per_step} s/step)", flush=True)
    clock = Clock(budget["eta_s"])

    def done(stage: str) -> None:
        clock.lap(stage)
        # Partial results after every stage: a long run that dies late keeps what it measured.
        _write_json(out / "results.json", {**results, "seconds": {"total": clock.total, "stages": clock.stages}, "complete": False})

    runner = StudyRunner(cfg)
    tasks = generated_tasks(cfg)
    complex_task = tasks[cfg.complex_task]
    results: dict[str, Any] = {"config": asdict(cfg), "paper": PAPER, "budget": budget, "real_data": real,
                               "model": {"name": cfg.model, "layers": runner.n_layers, "heads": runner.n_heads}}

    runner.reset()
    base_accuracy = runner.accuracy(complex_task.heldout[: cfg.eval_samples])
    done("base accuracy")

    f1 = finding1(runner, tasks, cfg.sft_steps, cfg.ap_samples, track=complex_task, patterns_dir=out / "patterns")
    raw = f1.pop("_raw")
    results["finding1"] = f1
    done("finding 1 (patterns before/after SFT)")

    f2 = composition(raw["delta"][cfg.complex_task], raw["delta"], cfg.components, cfg.controls)
    results["finding2"] = {k: v for k, v in f2.items() if k != "residual"}
    np.save(out / "patterns" / "residual.npy", np.asarray(f2["residual"]))
    done("finding 2 (composition)")

    f3: dict[str, Any] = {"over_steps": change_over_steps(raw["tracked"]) if raw["tracked"] is not None else None,
                          "full_sft_accuracy": f1.pop("full_sft_accuracy"), "base_accuracy": base_accuracy}
    f3["restricted"] = finding3_restricted(runner, complex_task, raw["delta"][cfg.complex_task], raw["before"][cfg.complex_task])
    results["finding3"] = f3
    done("finding 3 (change over steps, head-restricted SFT)")

    fit_for_mix = f2.get("all_basic", f2["main"])[cfg.mix_method]
    app = application(runner, tasks, fit_for_mix["alpha"], out / "mix")
    app["accuracy"] = {"base": mean_std([base_accuracy]), **app["accuracy"]}
    app["alpha_fit"] = {"method": cfg.mix_method, "bases": list(fit_for_mix["alpha"]), "r2": fit_for_mix["r2"]}
    results["application"] = app
    done("application (AP-guided mixing)")

    raw_real = None
    if real:
        print("[study] real tasks: GSM8K, HumanEval, GSM8K-as-Python", flush=True)
        from lit_heads.data import SFTDataModule

        real_data = SFTDataModule(tokenizer=runner.module.tokenizer, max_length=cfg.real_max_length, batch_size=cfg.batch_size, seed=cfg.seed)
        real_ap = SFTDataModule(tokenizer=runner.module.tokenizer, max_length=cfg.real_max_length, batch_size=cfg.ap_batch_size)
        rtasks = real_tasks(cfg, real_data.encoder)
        rf1 = finding1(runner, rtasks, cfg.real_sft_steps, cfg.real_ap_samples, data=real_data, ap_data=real_ap, patterns_dir=out / "patterns")
        raw_real = rf1.pop("_raw")
        # Control: a generated basic task not part of the composite (the real set has no third task).
        deltas = {**raw_real["delta"], **{c: raw["delta"][c] for c in cfg.controls}}
        rf2 = composition(raw_real["delta"]["gsm8k_python"], deltas, list(REAL_COMPONENTS), cfg.controls)
        np.save(out / "patterns" / "residual_real.npy", np.asarray(rf2["residual"]))
        results["real"] = {"finding1": rf1, "finding2": {k: v for k, v in rf2.items() if k != "residual"},
                           "sizes": {n: {"train": len(t.train), "heldout": len(t.heldout)} for n, t in rtasks.items()}}
        done("real tasks (findings 1-2)")

    results["seconds"] = {"total": clock.total, "stages": clock.stages}
    results["complete"] = True
    # Numbers first: a failure while drawing must not lose an hour of results.
    _write_json(out / "results.json", results)
    write_report(out, results, raw, np.asarray(f2["residual"]), raw_real)
    print(f"[study] done in {clock.total / 60:.1f} min; wrote {out}/report.md, results.json, figures/", flush=True)
    return results


def _write_json(path: Path, data: dict) -> None:
    from lit_heads.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
