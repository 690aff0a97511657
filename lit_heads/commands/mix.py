"""`lit_heads mix`: an AP-guided mix of basic-task data, written as prompt_response JSONL.

    # α from `lit_heads compose` (its nnls fit by default), pools from files or generated tasks:
    lit_heads mix --alpha out/compose/compose.json --pools arithmetic=generated:arithmetic,code=generated:code \
        --n 200 --seed 0 --output mix.jsonl
    lit_heads mix --alpha arithmetic=0.6,code=0.3,string=-0.1 --rule clip \
        --pools arithmetic=math.jsonl,code=code.jsonl,string=generated:string --n 120 --output mix.jsonl

Task i gets N·w_i/Σw samples with w = max(α, 0) (rule clip: a negative or zero weight means the task
gets no samples) or w = |α| (rule abs); see lit_heads/analysis/mix.py. The output trains with
`lit_heads fit --data.train mix.jsonl`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lit_heads.commands.compose import parse_named
from lit_heads.errors import ConfigError, DataError


def read_alpha(spec: str | list[str], method: str = "nnls") -> dict[str, float]:
    """α from a JSON file (compose.json: fits.<method>.alpha; or a flat {task: weight}) or 'a=0.6,b=0.4'."""
    if isinstance(spec, str) and spec.lower().endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--alpha file {path} does not exist; give compose.json from `lit_heads compose` or a "
                              f"{{task: weight}} JSON file.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None
        if isinstance(data, dict) and "fits" in data:
            if method not in data["fits"]:
                raise ConfigError(f"{path} holds fits {sorted(data['fits'])}, not {method!r}; pass --method with one "
                                  "of them.")
            data = data["fits"][method]["alpha"]
        if not isinstance(data,
                          dict) or not all(isinstance(v, (int, float)) and not isinstance(v,
                                                                                          bool) for v in data.values()):
            raise DataError(f"{path} must hold {{task: weight}} numbers or a compose.json; got {type(data).__name__}.")
        return {str(k): float(v) for k, v in data.items()}
    alpha = {}
    for name, text in parse_named(spec, "alpha").items():
        try:
            alpha[name] = float(text)
        except ValueError:
            raise ConfigError(f"--alpha {name}={text!r}: the weight is not a number.") from None
        if not math.isfinite(alpha[name]):
            raise ConfigError(f"--alpha {name}={text!r}: the weight must be finite.")
    return alpha


def mix(
    alpha: list[str] | str,
    pools: list[str] | str,
    output: str = "mix.jsonl",
    n: int = 200,
    seed: int = 0,
    rule: str = "clip",
    method: str = "nnls",
    format: str = "auto",
) -> dict:
    """Draw n samples from the basic-task pools in the proportions α_i / Σα and write them as JSONL.

    Args:
        alpha: compose.json (from `lit_heads compose`), a {task: weight} JSON file, or task=weight,... .
        pools: task=source, comma-separated: a data file (.jsonl/.json/.parquet), a hub id, or generated:<task>.
        output: the JSONL file written (prompt, response, answer, task per line), atomically.
        n: number of samples in the mix.
        seed: seed of the draw (and of generated pools).
        rule: clip (negative α -> 0, then renormalise) or abs (use |α|).
        method: which fit of a compose.json to read α from (nnls or lstsq).
        format: record format of pool files (auto-detected by default).
    """
    from lit_heads.analysis.mix import build_mix, mix_counts, write_jsonl
    from lit_heads.data import load_source

    weights = read_alpha(alpha, method)
    counts = mix_counts(weights, n, rule)  # validates rule, n and α before any data is read
    sources = parse_named(pools, "pools")
    missing = sorted(t for t, k in counts.items() if k > 0 and t not in sources)
    if missing:
        raise ConfigError(f"The mix needs samples of {missing} but --pools gives only {sorted(sources)}; add e.g. "
                          f"{missing[0]}=generated:{missing[0]}.")
    # Only the pools the mix draws from are read; a generated pool holds exactly what the mix needs.
    loaded = {t: load_source(sources[t], size=max(counts[t], 1), seed=seed,
                             format=format) for t in counts if counts[t] > 0}
    records = build_mix(weights, loaded, n, seed=seed, rule=rule)
    path = write_jsonl(records, output)
    print(f"mix of {n} samples ({rule} rule): " + ", ".join(f"{t} {k}" for t, k in counts.items()) + f"\nwrote {path}")
    return {"counts": counts, "alpha": weights, "output": str(path)}


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    auto_cli(mix, args=argv, as_positional=False, prog="lit_heads mix")
