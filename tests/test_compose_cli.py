"""`lit_heads compose`: small patterns with known answers, before/after pairs, and clear errors."""

import json

import numpy as np
import pytest
import torch

from lit_heads.cli import main as cli_main
from lit_heads.commands.compose import compose, parse_named
from lit_heads.errors import ConfigError
from lit_heads.heads.pattern import Pattern

L, H = 5, 4


def _save(path, array, **meta):
    return str(Pattern(torch.tensor(array, dtype=torch.float32), meta).save(path))


@pytest.fixture
def bases(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = rng.random((L, H)), rng.random((L, H)), rng.random((L, H))
    return {"math": a, "code": b, "other": c}


def test_exact_composition_recovers_alpha_with_both_methods(tmp_path, bases, capsys):
    target = _save(tmp_path / "t.safetensors", 0.7 * bases["math"] + 0.3 * bases["code"])
    spec = ",".join(f"{n}={_save(tmp_path / f'{n}.safetensors', bases[n])}" for n in ("math", "code"))
    out = tmp_path / "out"
    cli_main(["compose", "--target", target, "--bases", spec, "--output", str(out)])

    result = json.loads((out / "compose.json").read_text())
    for method in ("lstsq", "nnls"):
        fit = result["fits"][method]
        # float32 storage limits how exactly the weights come back.
        assert fit["alpha"] == pytest.approx({"math": 0.7, "code": 0.3}, abs=1e-5)
        assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
        residual = np.load(out / f"residual_{method}.npy")
        assert residual.shape == (L, H) and np.abs(residual).max() < 1e-5
        assert (out / f"residual_{method}.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "R² = 1.0000" in printed and "0.7000·math" in printed


def test_before_after_pairs_are_differenced(tmp_path, bases):
    rng = np.random.default_rng(1)
    before = {n: rng.random((L, H)) for n in ("t", "math", "code")}
    # Each pattern starts from its own random "before", so only the changes compose exactly.
    after = {"math": before["math"] + bases["math"], "code": before["code"] + bases["code"]}
    after["t"] = before["t"] + 2.0 * bases["math"] - 0.5 * bases["code"]
    paths = {f"{n}_{w}": _save(tmp_path / f"{n}_{w}.safetensors", arr) for w, d in (("before", before),
                                                                                    ("after",
                                                                                     after)) for n, arr in d.items()}
    result = compose(
        target=paths["t_after"], target_before=paths["t_before"],
        bases=[f"math={paths['math_after']}", f"code={paths['code_after']}"],
        bases_before=f"math={paths['math_before']},code={paths['code_before']}",
        method="lstsq", output=str(tmp_path / "pairs"),
    )
    assert result["uses_changes"] is True
    assert set(result["fits"]) == {"lstsq"}
    assert result["fits"]["lstsq"]["alpha"] == pytest.approx({"math": 2.0, "code": -0.5}, abs=1e-5)
    assert result["fits"]["lstsq"]["r2"] == pytest.approx(1.0, abs=1e-9)


def test_nnls_keeps_alpha_non_negative_and_npy_inputs_work(tmp_path, bases):
    target = tmp_path / "t.npy"
    np.save(target, bases["math"] - 0.6 * bases["code"])
    for n in ("math", "code"):
        np.save(tmp_path / f"{n}.npy", bases[n])
    result = compose(str(target), f"math={tmp_path / 'math.npy'},code={tmp_path / 'code.npy'}", method="both",
                     output=str(tmp_path / "o"))
    assert result["fits"]["lstsq"]["alpha"]["code"] == pytest.approx(-0.6, abs=1e-6)
    assert min(result["fits"]["nnls"]["alpha"].values()) >= 0
    assert result["fits"]["nnls"]["r2"] < result["fits"]["lstsq"]["r2"]


def test_unrelated_basis_fits_worse(tmp_path, bases):
    target = _save(tmp_path / "t.safetensors", 0.7 * bases["math"] + 0.3 * bases["code"])
    real = compose(target,
                   f"math={_save(tmp_path / 'm.safetensors', bases['math'])},"
                   f"code={_save(tmp_path / 'c.safetensors', bases['code'])}",
                   method="lstsq", output=str(tmp_path / "a"))
    control = compose(target,
                      f"other={_save(tmp_path / 'x.safetensors', bases['other'])},code={tmp_path / 'c.safetensors'}",
                      method="lstsq", output=str(tmp_path / "b"))
    assert control["fits"]["lstsq"]["r2"] < real["fits"]["lstsq"]["r2"] - 0.01


def test_parse_named_forms_and_errors():
    assert parse_named("a=x, b=y", "bases") == {"a": "x", "b": "y"}
    assert parse_named(["a=x", "b=y,c=z"], "bases") == {"a": "x", "b": "y", "c": "z"}
    with pytest.raises(ConfigError, match="not name=value"):
        parse_named("a.safetensors", "bases")
    with pytest.raises(ConfigError, match="twice"):
        parse_named("a=x,a=y", "bases")


def test_inconsistent_before_after_options_are_rejected(tmp_path, bases):
    p = _save(tmp_path / "p.safetensors", bases["math"])
    with pytest.raises(ConfigError, match="together"):
        compose(p, f"math={p}", target_before=p, output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="bases_before names"):
        compose(p, f"math={p}", target_before=p, bases_before=f"code={p}", output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="method"):
        compose(p, f"math={p}", method="ridge", output=str(tmp_path / "o"))


def test_mixed_formula_versions_are_refused(tmp_path, bases):
    t = _save(tmp_path / "t.safetensors", bases["math"], formula_version="ap-eq2-v0")
    b = _save(tmp_path / "b.safetensors", bases["code"])
    with pytest.raises(ConfigError, match="formula versions"):
        compose(t, f"b={b}", output=str(tmp_path / "o"))


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["compose", "--target", str(tmp_path / "missing.safetensors"), "--bases",
                  f"a={tmp_path / 'a.safetensors'}",
                  "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
