"""The study's settings, checked before any model is loaded (configs/study.yaml is the default profile,
configs/study_quick.yaml the CI one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lit_heads.errors import ConfigError, DataError

# The ways of choosing the held-out samples a fine-tuned model's pattern is measured on (issue 13, item 2);
# `tasks.probe` draws them.
PROBES = ("own", "complex", "mix")


@dataclass
class StudyConfig:
    """The whole study's settings. The defaults are the default profile, configs/study.yaml, which shows
    every field with its reasons (tests/test_study.py keeps the two equal), so a bare `lit_heads study`
    runs the same study as `--config configs/study.yaml`.

    Args:
        model: bundled short name, HF directory, .gguf file or hub id; or a list of them: each model runs the
            same tasks and seeds into output/<model>/, and output/report.md puts them side by side.
        output: folder for report.md, results.json, figures/, patterns/ and mix/.
        combine: run folders of earlier studies (each with its results.json) to put side by side in
            output/report.md; nothing is trained when this is set.
        device: where the model trains, is scored and generates: 'cpu', 'cuda', 'cuda:N' or 'mps'.
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
        probes: which held-out samples every model's pattern is measured on, one Finding 2 per mode:
            'own' (a: each model on its own task's samples), 'complex' (b: every model on the complex
            task's samples), 'mix' (c: every model on a fixed mix of all tasks' samples). The first mode
            is the main one: Finding 1, the head-restricted arms and the mix's α use it.
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
        gen_batch_size: answers generated at once (decoding a token costs about the same for 16 or 32 on a CPU,
            since reading the weights dominates, so larger batches finish the grading sooner).
        complex_train_size: the scarce complex-task training set of the application.
        mix_steps: steps of the first (mix) stage of the application.
        complex_steps: steps of the second (complex data) stage; complex-only SFT gets both budgets.
        mix_size: basic-task samples in a mix; null = mix_steps * batch_size (one pass).
        mix_method: fit whose α makes the mix: 'nnls' (α ≥ 0) or 'lstsq'.
        mix_rule: what happens to negative α ('clip' drops them, 'abs' uses |α|); see analysis/mix.py.
        basic_train_sizes: training pool of each basic task (one number for all, or {task: size}); the
            mixes draw from these pools and the size-weighted mix weights each task by its pool's size.
        seeds: seeds of the application's arms (spread over seeds is reported).
        ci: confidence level of the t-intervals over seeds (mean ± CI, paired differences); null reports
            mean and standard deviation only. A CI needs at least 2 seeds.
        ablate_k: numbers of heads masked in the causal check of the rankings (top-k, random-k, bottom-k by
            the complex task's fine-tuned AP and by its |ΔAP|; `lit_heads ablate`'s logic); each at most the
            model's number of heads.
        ablate_seeds: seeds of the random-k heads of the causal check.
        ablate_samples: held-out complex-task samples (disjoint from the probes and the graded ones) whose
            loss the causal check measures.
        ablate_mask: 'mean' (a masked head outputs its mean over those samples) or 'zero'.
        real_sft_steps: SFT steps per real task.
        real_ap_samples: held-out samples per real task for its pattern.
        real_max_length: tokens per real-task sample (longer responses are cut; longer prompts dropped).
        real_train_size: real-task training samples loaded (GSM8K-as-Python rows are run in the sandbox).
        sec_per_step: planning estimate of one SFT step at max_length (for the printed ETA).
        sec_per_ap_sample: planning estimate of scoring one sample's pattern.
        sec_per_gen_sample: planning estimate of generating and grading one answer.
        sec_per_loss_sample: planning estimate of one sample's loss (a forward pass) in the causal check.
        progress_bar: show Lightning's progress bar while training.
    """

    model: str | list[str] = "smollm2-135m"
    output: str = "runs/study"
    combine: list[str] = field(default_factory=list)
    device: str = "cpu"
    seed: int = 42
    basic_tasks: list[str] = field(default_factory=lambda: ["multistep", "code", "string"])
    complex_task: str = "multistep_code"
    real_data: str = "off"
    shared_data: str = "../shared/data"
    max_length: int = 208
    batch_size: int = 2
    lr: float = 3e-4
    warmup_steps: int = 5
    ap_samples: int = 16
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    ap_batch_size: int = 8
    sft_steps: int = 16
    top_k: int = 20
    track_every: int = 8
    track_samples: int = 8
    restricted_top_k: int = 27
    restricted_lr: float = 2e-3
    restricted_random: bool = True
    eval_samples: int = 24
    max_new_tokens: int = 64
    gen_batch_size: int = 32
    complex_train_size: int = 16
    mix_steps: int = 8
    complex_steps: int = 8
    mix_size: int | None = None
    mix_method: str = "nnls"
    mix_rule: str = "clip"
    basic_train_sizes: int | dict[str, int] = 1000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    ci: float | None = 0.95
    ablate_k: list[int] = field(default_factory=lambda: [3, 9, 27])
    ablate_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablate_samples: int = 12
    ablate_mask: str = "mean"
    real_sft_steps: int = 6
    real_ap_samples: int = 12
    real_max_length: int = 320
    real_train_size: int = 40
    sec_per_step: float = 2.8
    sec_per_ap_sample: float = 0.55
    sec_per_gen_sample: float = 0.8
    sec_per_loss_sample: float = 0.4
    progress_bar: bool = True

    def validate(self) -> "StudyConfig":
        from lit_heads.analysis.ablation import check_schedule
        from lit_heads.analysis.compose import METHODS
        from lit_heads.analysis.mix import RULES
        from lit_heads.data.tasks import get_task
        from lit_heads.heads.ablation import MASK_MODES

        resolve_device(self.device)
        models = self.models
        if not models:
            raise ConfigError("model is an empty list; name at least one model (e.g. smollm2-135m).")
        folders = [run_folder(m) for m in models]
        if len(set(folders)) != len(folders):
            raise ConfigError(f"model lists {models}, whose run folders {folders} collide; name each model once.")
        complex_spec = get_task(self.complex_task)
        if complex_spec.kind != "complex":
            raise ConfigError(
                f"complex_task {self.complex_task!r} is a {complex_spec.kind} task; use a complex one (math_code)."
            )
        for name in self.basic_tasks:
            if get_task(name).kind != "basic":
                raise ConfigError(f"basic_tasks lists {name!r}, which is not a basic task.")
        missing = [c for c in complex_spec.components if c not in self.basic_tasks]
        if missing:
            raise ConfigError(
                f"{self.complex_task} is made of {list(complex_spec.components)}, but basic_tasks {self.basic_tasks} "
                f"lacks {missing}; the composition needs every component."
            )
        if self.real_data not in ("auto", "on", "off"):
            raise ConfigError(f"real_data={self.real_data!r}; use 'auto', 'on' or 'off'.")
        if self.mix_method not in METHODS or self.mix_rule not in RULES:
            raise ConfigError(
                f"mix_method must be one of {METHODS} and mix_rule one of {RULES}; "
                f"got {self.mix_method!r}, {self.mix_rule!r}."
            )
        if not self.seeds:
            raise ConfigError("seeds is empty; the application needs at least one seed (three for a spread).")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds {self.seeds} repeats a seed; a repeated seed is the same run twice, not a new "
                              "sample.")
        if self.ci is not None:
            if not 0 < self.ci < 1:
                raise ConfigError(f"ci={self.ci}; give a confidence level between 0 and 1 (0.95), or null for no "
                                  "interval.")
            if len(self.seeds) < 2:
                raise ConfigError(
                    f"ci={self.ci} asks for a confidence interval over seeds, but seeds={self.seeds} has "
                    f"{len(self.seeds)}; a t-interval needs at least 2 seeds (5 or more for a useful one), or set ci: "
                    "null."
                )
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown or not self.probes or len(set(self.probes)) != len(self.probes):
            raise ConfigError(
                f"probes={self.probes}: " + (f"unknown probe mode(s) {unknown}; " if unknown else "")
                + f"give one or more distinct modes of {list(PROBES)} ('own': each model on its own task's held-out "
                "samples, 'complex': on the complex task's, 'mix': on a fixed mix of all tasks'); the first is the "
                "main one."
            )
        if "mix" in self.probes:
            mix_probe_share(self.ap_samples, len(self.basic_tasks) + 1)
        try:
            check_schedule(self.ablate_k, None, ("top", "random", "bottom"), self.ablate_seeds)
        except ConfigError as err:  # its message names the ablate command's flags; say which field it was
            raise ConfigError(f"ablate_k={self.ablate_k}, ablate_seeds={self.ablate_seeds}: {err}") from err
        if self.ablate_mask not in MASK_MODES:
            raise ConfigError(f"ablate_mask={self.ablate_mask!r}; use one of {list(MASK_MODES)} ('mean': a masked head "
                              "outputs its mean over the held-out samples, 'zero': nothing).")
        sizes = self.train_sizes()
        too_small = {t: n for t, n in sizes.items() if n < 1}
        if too_small:
            raise ConfigError(f"basic_train_sizes {too_small}: every basic task needs a training pool of at least 1 "
                              "sample.")
        counts = dict(ap_samples=self.ap_samples, track_samples=self.track_samples,
                      real_ap_samples=self.real_ap_samples)
        small = {k: v for k, v in counts.items() if v < 2}
        if small:
            raise ConfigError(f"{small}: a pattern needs at least 2 samples (two disjoint halves).")
        positive = dict(sft_steps=self.sft_steps, mix_steps=self.mix_steps, complex_steps=self.complex_steps,
                        eval_samples=self.eval_samples, complex_train_size=self.complex_train_size,
                        gen_batch_size=self.gen_batch_size, ablate_samples=self.ablate_samples, top_k=self.top_k,
                        restricted_top_k=self.restricted_top_k,
                        batch_size=self.batch_size, track_every=self.track_every, real_sft_steps=self.real_sft_steps)
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ConfigError(f"{bad}: these must be >= 1.")
        return self

    def check_heads(self, model: str, n_heads: int) -> None:
        """Refuse every k of the config larger than the model's number of heads (all layers together)."""
        ks = {"top_k": self.top_k, "restricted_top_k": self.restricted_top_k,
              "ablate_k": self.ablate_k if max(self.ablate_k) > n_heads else None}
        too_big = [f"{name}={value}" for name, value in ks.items()
                   if value is not None and (isinstance(value, list) or value > n_heads)]
        if too_big:
            raise ConfigError(
                f"{', '.join(too_big)}: larger than the {n_heads} attention heads of {model}; every k of the study "
                f"(top_k, restricted_top_k, each of ablate_k) must be from 1 to {n_heads}."
            )

    @property
    def components(self) -> list[str]:
        from lit_heads.data.tasks import get_task

        return list(get_task(self.complex_task).components)

    @property
    def controls(self) -> list[str]:
        return [t for t in self.basic_tasks if t not in self.components]

    def train_sizes(self) -> dict[str, int]:
        """Training pool of every basic task, from `basic_train_sizes`."""
        sizes = self.basic_train_sizes
        if isinstance(sizes, int):
            return {t: sizes for t in self.basic_tasks}
        unknown = sorted(set(sizes) - set(self.basic_tasks))
        missing = [t for t in self.basic_tasks if t not in sizes]
        if unknown or missing:
            raise ConfigError(
                f"basic_train_sizes {sizes} must name exactly the basic tasks {self.basic_tasks}"
                + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
                + ", or be one number for all."
            )
        return dict(sizes)

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(self.model)

    @property
    def main_probe(self) -> str:
        return self.probes[0]

    @property
    def n_mix(self) -> int:
        return self.mix_size if self.mix_size is not None else self.mix_steps * self.batch_size

    def use_real(self) -> bool:
        root = Path(self.shared_data)
        present = (root / "gsm8k" / "train.jsonl").is_file() and (root / "humaneval" / "HumanEval.jsonl").is_file()
        if self.real_data == "on" and not present:
            raise DataError(
                f"real_data: on, but {self.shared_data} has no gsm8k/train.jsonl and humaneval/HumanEval.jsonl; "
                "set real_data: auto or off."
            )
        return self.real_data == "on" or (self.real_data == "auto" and present)


def mix_probe_share(n: int, n_tasks: int) -> int:
    """Samples per task in the 'mix' probe of n samples over n_tasks tasks; refused unless it is even and
    >= 2, so both halves of the probe hold every task equally."""
    per_task = n // n_tasks
    if per_task < 2 or per_task % 2:
        raise ConfigError(
            f"probe mode 'mix' takes n // {n_tasks} tasks = {per_task} samples per task from n={n}; it needs an even "
            f"number >= 2 per task so both halves hold every task. Use ap_samples = a multiple of {2 * n_tasks}."
        )
    return per_task


def run_folder(model: str) -> str:
    """The sub-folder of `output` a model's study goes to when several models run: a path's last part,
    or the name with '/' spelled '--' (a hub id)."""
    path = Path(model).expanduser()
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return model.strip("/").replace("/", "--")


# Weights of the matrix products one token passes through (every nn.Linear, the output head included even when
# tied) of SmolLM2-135M, the model the sec_per_* estimates were measured on; a model's cost per token scales
# with its own count (Gemma 3 270M: about 2x, mostly its 262k-token output head).
REFERENCE_MATMUL_WEIGHTS = 134_479_872


def model_shape(model: str) -> dict[str, int] | None:
    """{'heads': attention heads of all layers, 'matmul_weights': see REFERENCE_MATMUL_WEIGHTS} of `model` from
    its config alone, on the meta device (no weights), so a k too large is refused and the plan is scaled before
    any model loads; None when the config cannot be read without loading (a hub id not in the local cache):
    the runner checks the k after loading, and the plan keeps the reference model's cost."""
    from torch import nn
    from transformers import AutoConfig

    from lit_heads.analysis.memory_plan import meta_model
    from lit_heads.heads import find_heads
    from lit_heads.models import resolve

    source = resolve(model)
    try:
        config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError):
        return None
    skeleton = meta_model(config)
    n_layers, n_heads = find_heads(skeleton).shape
    matmul = sum(m.weight.numel() for m in skeleton.modules() if isinstance(m, nn.Linear))
    return {"heads": n_layers * n_heads, "matmul_weights": matmul}


def resolve_device(name: str) -> torch.device:
    """The torch device `name` stands for, refused before any model loads when this machine lacks it.
    A bare 'cuda' means the first GPU, so training, scoring and generation all use the same one."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={name!r} is not a device name; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={name!r}, but CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use device: cpu, or run on a machine with a GPU."
            )
        index = device.index or 0
        if index >= count:
            raise ConfigError(f"device={name!r}, but this machine has {count} CUDA device(s): "
                              f"use one of cuda:0 to cuda:{count - 1}, or cpu.")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={name!r}, but MPS (Apple GPU) is not available here; use device: cpu.")
        return device
    raise ConfigError(f"device={name!r}: the study runs on 'cpu', 'cuda', 'cuda:N' or 'mps'.")
