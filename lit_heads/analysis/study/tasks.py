"""The study's tasks, each split once into a train part and a held-out part, and the one rule for
which held-out samples a pattern is measured on."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from lit_heads.analysis.study.config import PROBES, StudyConfig, mix_probe_share
from lit_heads.data.records import Example
from lit_heads.errors import ConfigError, DataError

REAL_COMPONENTS = ("gsm8k", "humaneval")


@dataclass
class Task:
    name: str
    kind: str  # basic | complex
    train: list[Example]
    heldout: list[Example]
    # Held-out samples of the causal check (complex task only): apart from the probe and the graded samples,
    # so the heads are not ranked and then tested on the same samples.
    causal: list[Example] = field(default_factory=list)


def probe(tasks: dict[str, Task], name: str, n: int, mode: str = "own",
          complex_task: str | None = None) -> list[Example]:
    """The samples on which the pattern of a model trained on task `name` (or of the base model, for that
    task) is measured. Every pattern measurement asks here.

        own      (a) the first n of the task's own held-out part (the pattern *of the task*)
        complex  (b) the first n of the complex task's held-out part, whatever `name` is (one shared probe)
        mix      (c) a fixed mix of all tasks' held-out parts, n // len(tasks) from each, whatever `name` is

    The mix is laid out in pairs (two of task 1, two of task 2, ...), so its two halves (even and odd
    positions, see `StudyRunner.halves`) hold the same tasks in the same numbers."""
    if mode == "own":
        return tasks[name].heldout[:n]
    if mode == "complex":
        if complex_task is None:
            raise ConfigError("probe mode 'complex' needs the complex task's name.")
        return tasks[complex_task].heldout[:n]
    if mode == "mix":
        per_task = mix_probe_share(n, len(tasks))
        columns = [tasks[t].heldout[:per_task] for t in tasks]
        return [e for i in range(0, per_task, 2) for column in columns for e in column[i : i + 2]]
    raise ConfigError(f"Unknown probe mode {mode!r}; use one of {list(PROBES)}.")


def generated_tasks(cfg: StudyConfig) -> dict[str, Task]:
    """Each generated task's stream: the first samples are held out (patterns, grading), the next train
    (Finding 1 SFT, the mix pools, the scarce complex set), so the two never share a prompt; the complex
    task's last ablate_samples are the causal check's. A stream's first samples do not depend on its
    length, so the causal samples leave the other parts as they were."""
    from lit_heads.data import generate_task, get_task

    n_heldout = max(cfg.ap_samples, cfg.eval_samples, cfg.track_samples)
    sft = cfg.sft_steps * cfg.batch_size
    n_train = {**{t: max(sft, size) for t, size in cfg.train_sizes().items()},
               cfg.complex_task: max(sft, cfg.complex_train_size)}
    tasks = {}
    for name in [*cfg.basic_tasks, cfg.complex_task]:
        n_causal = cfg.ablate_samples if name == cfg.complex_task else 0
        examples = generate_task(name, n_heldout + n_train[name] + n_causal, cfg.seed)
        split = n_heldout + n_train[name]
        tasks[name] = Task(name, get_task(name).kind, examples[n_heldout:split], examples[:n_heldout],
                           examples[split:])
    return tasks


def check_fits(cfg: StudyConfig, tasks: dict[str, Task], encoder, model: str) -> dict[str, int]:
    """Refuse a max_length that would cut a generated sample, or a max_new_tokens that would cut a graded
    answer, in `model`'s tokenizer (`encoder`: its PromptEncoder at max_length; with or without a chat
    template, whichever the model's tokenizer has): tokenizers and templates differ between models, so a
    length that fits one can cut another. Returns the longest sample and the longest graded answer."""
    longest = max(len(encoder.prompt_ids(e)) + len(encoder.response_ids(e))
                  for t in tasks.values() for e in (*t.heldout, *t.train, *t.causal))
    graded = tasks[cfg.complex_task].heldout[: cfg.eval_samples]
    answer = max(len(encoder.response_ids(e)) for e in graded)
    template = "its chat template" if encoder.use_chat_template else "no chat template"
    if longest > cfg.max_length:
        raise ConfigError(
            f"max_length={cfg.max_length} would cut the responses of the longest generated samples for {model} "
            f"(its tokenizer, {template}): the longest needs {longest} tokens. Set max_length: {longest} or more."
        )
    if answer > cfg.max_new_tokens:
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} would cut graded answers of {cfg.complex_task} for {model} (its "
            f"tokenizer, {template}): the longest reference answer is {answer} tokens with its end marker. Set "
            f"max_new_tokens: {answer} or more."
        )
    return {"longest_sample": longest, "longest_answer": answer}


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
            raise DataError(f"{what}: only {len(kept)} samples fit real_max_length={cfg.real_max_length}, {n} needed; "
                            "raise real_max_length.")
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
        "gsm8k": Task("gsm8k", "basic", take(gsm_train, need_train, "gsm8k train"),
                      take(gsm_test, need_heldout, "gsm8k test")),
        "humaneval": Task("humaneval", "basic", take(humaneval[half:], need_train, "humaneval train"),
                          take(humaneval[:half], need_heldout, "humaneval held-out")),
        "gsm8k_python": Task("gsm8k_python", "complex", take(py_train, need_train, "GSM8K-as-Python train"),
                             take(py_test, need_heldout, "GSM8K-as-Python test")),
    }
