import numpy as np
import pytest
import torch

from lit_heads.analysis.compose import fit_composition
from lit_heads.errors import ConfigError, DataError

L, H = 6, 4


def _patterns(seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((L, H)), rng.random((L, H)), rng.random((L, H))


@pytest.mark.parametrize("method", ["lstsq", "nnls"])
def test_exact_composition_recovers_alpha_and_r2_one(method):
    a, b, _ = _patterns()
    fit = fit_composition(0.7 * a + 0.3 * b, {"math": a, "code": b}, method=method)
    assert fit.alpha["math"] == pytest.approx(0.7, abs=1e-6)
    assert fit.alpha["code"] == pytest.approx(0.3, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.residual.shape == (L, H)
    assert np.abs(fit.residual).max() < 1e-9
    assert fit.method == method


def test_accepts_torch_tensors_and_fits_intercept():
    a, b, _ = _patterns(1)
    target = torch.tensor(2.0 * a - 0.5 * b + 3.0, dtype=torch.float32)
    fit = fit_composition(target, {"a": torch.tensor(a), "b": torch.tensor(b)}, intercept=True)
    # float32 target limits the precision of the recovered weights.
    assert fit.alpha == pytest.approx({"a": 2.0, "b": -0.5}, abs=1e-5)
    assert fit.intercept == pytest.approx(3.0, abs=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_nnls_intercept_may_be_negative_while_alpha_stays_non_negative():
    a, b, _ = _patterns(2)
    fit = fit_composition(0.4 * a + 0.2 * b - 1.0, {"a": a, "b": b}, method="nnls", intercept=True)
    assert fit.alpha == pytest.approx({"a": 0.4, "b": 0.2}, abs=1e-9)
    assert fit.intercept == pytest.approx(-1.0, abs=1e-9)


def test_nnls_is_non_negative_where_lstsq_goes_negative():
    a, b, _ = _patterns(3)
    target = 1.0 * a - 0.6 * b
    free = fit_composition(target, {"a": a, "b": b}, method="lstsq")
    constrained = fit_composition(target, {"a": a, "b": b}, method="nnls")
    assert free.alpha["b"] == pytest.approx(-0.6, abs=1e-9)
    assert min(constrained.alpha.values()) >= 0.0
    assert constrained.alpha["b"] == 0.0  # the constraint binds for the negative component
    assert constrained.r2 < free.r2 == pytest.approx(1.0)


def test_noise_lowers_r2_in_proportion():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 30, 9))
    clean = 0.7 * a + 0.3 * b
    r2 = {}
    for sigma in (0.0, 0.1, 0.5):
        noisy = clean + sigma * rng.standard_normal(clean.shape)
        r2[sigma] = fit_composition(noisy, {"a": a, "b": b}).r2
    assert r2[0.0] == pytest.approx(1.0)
    assert r2[0.0] > r2[0.1] > r2[0.5]
    # var(clean) = 0.49 + 0.09 = 0.58, so the expected R² is 0.58 / (0.58 + σ²).
    assert r2[0.5] == pytest.approx(0.58 / (0.58 + 0.25), abs=0.08)


def test_unrelated_basis_is_a_low_r2_control():
    a, b, c = _patterns(5)
    target = 0.7 * a + 0.3 * b
    member = fit_composition(target, {"a": a, "b": b}).r2
    control = fit_composition(target - target.mean(), {"c": c - c.mean()}).r2
    assert member == pytest.approx(1.0)
    assert control < 0.5


def test_shape_mismatch_names_the_pattern():
    a, b, _ = _patterns()
    with pytest.raises(ConfigError, match=r"'code'.*\(6, 5\).*\(6, 4\)"):
        fit_composition(a, {"math": b, "code": np.ones((L, H + 1))})


def test_non_2d_pattern_is_rejected():
    a, b, _ = _patterns()
    with pytest.raises(ConfigError, match="'target'.*2-D"):
        fit_composition(np.stack([a, a]), {"b": b})


def test_no_bases_and_unknown_method_are_config_errors():
    a, b, _ = _patterns()
    with pytest.raises(ConfigError, match="no basis"):
        fit_composition(a, {})
    with pytest.raises(ConfigError, match="lstsq, nnls"):
        fit_composition(a, {"b": b}, method="ridge")


def test_constant_target_is_rejected():
    _, b, _ = _patterns()
    with pytest.raises(DataError, match="zero variance"):
        fit_composition(np.full((L, H), 0.1), {"b": b})


def test_nan_pattern_is_rejected():
    a, b, _ = _patterns()
    b[0, 0] = np.nan
    with pytest.raises(DataError, match="'b'.*NaN"):
        fit_composition(a, {"b": b})


def test_linearly_dependent_bases_warn():
    a, b, _ = _patterns()
    with pytest.warns(UserWarning, match="linearly dependent"):
        fit_composition(a + b, {"a": a, "a2": 2 * a, "b": b})
