"""Turn composition weights α into a data mix of basic tasks (the paper's AP-guided warm-up).

`fit_composition` says the complex task's pattern change ≈ Σ α_i · (basic task i's change). The mix
gives task i a share α_i / Σ α of the N warm-up samples; training on it first, then on the scarce
complex data, is what beat a random mix in the paper (arXiv 2409.15820).

Negative or zero weights cannot be a share of data, so `rule` says what to do with them:
  - "clip" (default): negative α → 0, then renormalise over the rest. A negative weight means the
    task pulls the pattern the wrong way, so leaving it out is the faithful reading. All α ≤ 0 is an
    error. (Fitting with method="nnls" avoids negative weights in the first place.)
  - "abs": use |α|, i.e. treat a task's relevance as the size of its weight whatever the sign.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from lit_heads.atomic import atomic_write_text
from lit_heads.data.records import Example
from lit_heads.errors import ConfigError, DataError

RULES = ("clip", "abs")
RECORD_KEYS = ("prompt", "response", "answer", "task")


def mix_counts(alpha: Mapping[str, float], n: int, rule: Literal["clip", "abs"] = "clip") -> dict[str, int]:
    """Samples per task: n · w_i / Σ w, with w from α by `rule`, rounded so the counts sum to n.

    Largest-remainder rounding: every task gets the floor of its quota, and the samples left over go
    to the largest fractional parts (ties by task name), so no task is ever off by more than one.
    """
    if rule not in RULES:
        raise ConfigError(f"Unknown mix rule {rule!r}; use one of {', '.join(RULES)} (see lit_heads.analysis.mix).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"The mix size n must be a non-negative integer, got {n!r}.")
    if not alpha:
        raise ConfigError("mix_counts got no weights; pass alpha as {task: weight}, e.g. CompositionFit.alpha.")
    bad = {task: a for task, a in alpha.items() if not math.isfinite(a)}
    if bad:
        raise ConfigError(f"Mix weights must be finite numbers; got {bad}. Refit the composition.")

    weights = {task: (abs(a) if rule == "abs" else max(a, 0.0)) for task, a in alpha.items()}
    total = sum(weights.values())
    if total <= 0:
        fix = "use rule='abs' to mix by |α|, or " if rule == "clip" else ""
        raise ConfigError(
            f"No task has a positive mix weight (α = {dict(alpha)}), so there is nothing to mix; "
            f"{fix}refit with method='nnls' and check that the basis tasks belong to the target task."
        )

    tasks = sorted(weights)  # name order makes the result independent of the dict's order
    quotas = {task: n * weights[task] / total for task in tasks}
    counts = {task: math.floor(quotas[task]) for task in tasks}
    left = n - sum(counts.values())
    by_remainder = sorted(tasks, key=lambda t: quotas[t] - counts[t], reverse=True)  # stable: ties stay by name
    for task in by_remainder[:left]:
        counts[task] += 1
    return {task: counts[task] for task in alpha}


def _with_task(record: Any, task: str) -> Any:
    """A dict record without a task gets its pool's name, so the mix still says where it came from."""
    if isinstance(record, Mapping) and record.get("task") is None:
        return {**record, "task": task}
    return record


def build_mix(
    alpha: Mapping[str, float],
    pools: Mapping[str, Sequence[Any]],
    n: int,
    seed: int = 0,
    rule: Literal["clip", "abs"] = "clip",
) -> list[Any]:
    """Draw n records from `pools` ({task: records}) in the proportions of `mix_counts`, shuffled.

    Records are returned as given (Example objects or dicts; a dict without "task" gets its pool's
    name). A task is sampled without replacement when its pool is large enough. Otherwise the whole
    pool is repeated as often as it fits and the rest drawn without replacement, so copies are as
    even as possible; a UserWarning says so, since repeated samples change what the mix teaches.
    The same seed gives the same list.
    """
    counts = mix_counts(alpha, n, rule)
    missing = sorted(task for task, k in counts.items() if k > 0 and task not in pools)
    if missing:
        raise ConfigError(
            f"The mix needs samples from {missing} but no pool was given for them (pools: "
            f"{sorted(pools)}); pass pools keyed by the same task names as alpha."
        )
    rng = random.Random(seed)
    mixed: list[Any] = []
    for task in sorted(counts):
        k = counts[task]
        if k == 0:
            continue
        pool = list(pools[task])
        if not pool:
            raise DataError(f"The pool for task {task!r} is empty but the mix needs {k} samples from it.")
        if k <= len(pool):
            drawn = rng.sample(pool, k)
        else:
            repeats, rest = divmod(k, len(pool))
            warnings.warn(
                f"Task {task!r} needs {k} samples but its pool has {len(pool)}; repeating the pool "
                f"{repeats}× plus {rest} more. Provide more data or a smaller n to avoid duplicates.",
                stacklevel=2,
            )
            drawn = pool * repeats + rng.sample(pool, rest)
        mixed.extend(_with_task(record, task) for record in drawn)
    rng.shuffle(mixed)
    return mixed


def _as_record(record: Any, index: int) -> dict[str, Any]:
    if isinstance(record, Example):
        record = {key: getattr(record, key) for key in RECORD_KEYS}
    if not isinstance(record, Mapping):
        raise DataError(
            f"Record {index} is a {type(record).__name__}; write_jsonl needs an Example or a dict with "
            f"'prompt' and 'response' (and optionally 'answer', 'task')."
        )
    # A prompt may also be chat messages (a list), which the prompt_response format reads back as such.
    if not isinstance(record.get("prompt"), (str, list)) or not isinstance(record.get("response"), str):
        raise DataError(
            f"Record {index} needs a string 'response' and a string (or chat-message list) 'prompt'; it "
            f"has prompt={type(record.get('prompt')).__name__}, response={type(record.get('response')).__name__}. "
            f"Fix the pool it came from."
        )
    return {key: record.get(key) for key in RECORD_KEYS}


def write_jsonl(records: Iterable[Any], path: str | os.PathLike) -> Path:
    """Write records as prompt_response JSONL (keys prompt, response, answer, task), atomically.

    The file is written to a temporary file in the same folder and moved into place with
    os.replace, so a reader (or a crashed run) never sees half a file. Returns the path.
    """
    path = Path(path)
    # Validate everything before touching the disk, so a bad record leaves no trace.
    lines = [json.dumps(_as_record(r, i), ensure_ascii=False) for i, r in enumerate(records)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path
