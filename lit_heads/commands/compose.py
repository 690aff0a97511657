"""`lit_heads compose`: fit a (complex task's) pattern as a weighted sum of other (basic tasks') patterns.

    # patterns that already are changes (ΔAP = after SFT − before), e.g. the study's *_delta files:
    cd runs/study/patterns && lit_heads compose --target math_code_delta.safetensors \
        --bases arithmetic=arithmetic_delta.safetensors,code=code_delta.safetensors

    # before/after pairs: the command takes the differences itself
    lit_heads compose --target mc_after.safetensors --target_before mc_before.safetensors \
        --bases math=m_after.safetensors,code=c_after.safetensors \
        --bases_before math=m_before.safetensors,code=c_before.safetensors --method nnls

Prints α and R² for each method, and writes compose.json, residual_<method>.npy and
residual_<method>.png to --output. Patterns are lit_heads .safetensors files (`lit_heads ap`,
`Pattern.save`) or bare L x H .npy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lit_heads.errors import ConfigError

METHOD_CHOICES = ("lstsq", "nnls", "both")


def parse_named(spec: str | list[str] | None, option: str) -> dict[str, str]:
    """'a=x,b=y' (or ['a=x', 'b=y'], or a mix) -> {'a': 'x', 'b': 'y'}, in the order given."""
    if spec is None:
        return {}
    items = [spec] if isinstance(spec, str) else list(spec)
    named: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise ConfigError(f"--{option}: {part!r} is not name=value; write e.g. --{option} "
                                  "math=math.safetensors,code=code.safetensors.")
            if name.strip() in named:
                raise ConfigError(f"--{option} names {name.strip()!r} twice; give each name once.")
            named[name.strip()] = value.strip()
    return named


def load_pattern(path: str):
    """A Pattern from a lit_heads .safetensors file or a bare .npy array."""
    from lit_heads.heads.pattern import Pattern

    return Pattern.from_npy(path) if Path(path).suffix.lower() == ".npy" else Pattern.load(path)


def _check_versions(patterns: dict) -> None:
    # Patterns scored under different AP definitions must never be mixed silently.
    versions = {name: p.meta.get("formula_version") for name, p in patterns.items() if p.meta.get("formula_version")}
    if len(set(versions.values())) > 1:
        raise ConfigError(f"The patterns were computed with different AP formula versions {versions}; recompute them "
                          "with one lit_heads version.")


def compose(
    target: str,
    bases: list[str] | str,
    target_before: str | None = None,
    bases_before: list[str] | str | None = None,
    method: str = "both",
    intercept: bool = False,
    output: str = "out/compose",
) -> dict:
    """Fit target ≈ Σ α_i base_i (+ intercept) over all layer x head entries; print and save α and R².

    Args:
        target: pattern file of the complex task (a ΔAP, or its after-SFT AP with --target_before).
        bases: basic-task patterns as name=path, comma-separated (or a list in YAML).
        target_before: the target's pattern before SFT; the fit then uses target − target_before.
        bases_before: the bases' patterns before SFT as name=path, for the same names as --bases.
        method: lstsq (unconstrained α), nnls (α >= 0, usable as a data mix) or both.
        intercept: also fit a free constant added to every head.
        output: folder for compose.json, residual_<method>.npy and residual_<method>.png.
    """
    from lit_heads.analysis.compose import fit_composition
    from lit_heads.atomic import atomic_write_text, writable_dir
    from lit_heads.heads.pattern import heatmap

    if method not in METHOD_CHOICES:
        raise ConfigError(f"--method {method!r}; use one of {', '.join(METHOD_CHOICES)}.")
    base_paths = parse_named(bases, "bases")
    if not base_paths:
        raise ConfigError("--bases is empty; give at least one basic-task pattern as name=path.")
    before_paths = parse_named(bases_before, "bases_before")
    if before_paths and set(before_paths) != set(base_paths):
        raise ConfigError(f"--bases_before names {sorted(before_paths)} but --bases names {sorted(base_paths)}; give a "
                          "before pattern for each base.")
    if bool(before_paths) != (target_before is not None):
        raise ConfigError("Give --target_before and --bases_before together (before/after pairs for every pattern), or "
                          "neither (patterns are already changes).")
    out = writable_dir(output)

    loaded = {"target": load_pattern(target), **{f"base {n}": load_pattern(p) for n, p in base_paths.items()}}
    if target_before is not None:
        loaded.update({"target before": load_pattern(target_before),
                       **{f"base {n} before": load_pattern(p) for n, p in before_paths.items()}})
    _check_versions(loaded)

    def value(name: str) -> np.ndarray:
        after = loaded[name].numpy().astype(np.float64)
        before = loaded.get(f"{name} before")
        return after - before.numpy() if before is not None else after

    y = value("target")
    xs = {n: value(f"base {n}") for n in base_paths}
    methods = ("lstsq", "nnls") if method == "both" else (method,)
    result = {
        "target": target, "target_before": target_before, "bases": base_paths, "bases_before": before_paths or None,
        "uses_changes": target_before is not None, "intercept": intercept, "fits": {},
    }
    for m in methods:
        fit = fit_composition(y, xs, method=m, intercept=intercept)
        np.save(out / f"residual_{m}.npy", fit.residual)
        heatmap(fit.residual, out / f"residual_{m}.png", title=f"residual of the {m} fit (R² {fit.r2:.3f})",
                cmap="coolwarm")
        result["fits"][m] = {"alpha": fit.alpha, "r2": fit.r2, "intercept": fit.intercept}
        terms = " ".join(f"{'-' if a < 0 else '+'} {abs(a):.4f}·{n}" for n, a in fit.alpha.items()).lstrip("+ ")
        offset = f" {'-' if fit.intercept < 0 else '+'} {abs(fit.intercept):.4g}" if intercept else ""
        print(f"{m:>5}: target ≈ {terms}{offset}   R² = {fit.r2:.4f}")
    atomic_write_text(out / "compose.json", json.dumps(result, indent=2))
    print(f"wrote {out}/compose.json and residual_<method>.npy/.png")
    return result


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    auto_cli(compose, args=argv, as_positional=False, prog="lit_heads compose")
