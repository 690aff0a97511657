from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from lit_heads.errors import ConfigError
from lit_heads.heads import Pattern, stats


def test_gini_hand_cases():
    assert stats.gini(torch.ones(7)) == pytest.approx(0.0, abs=1e-12)
    for n in (2, 5, 12):
        onehot = np.zeros(n)
        onehot[n // 2] = 3.0
        assert stats.gini(onehot) == pytest.approx((n - 1) / n)
    # [1, 2, 3]: mean abs difference over all ordered pairs = 8/9; G = (8/9) / (2 * 2) = 2/9
    assert stats.gini([3.0, 1.0, 2.0]) == pytest.approx(2 / 9)
    assert stats.gini(np.zeros(4)) == 0.0
    with pytest.raises(ConfigError, match="non-negative"):
        stats.gini([1.0, -1.0])


def test_gini_matches_pairwise_definition():
    x = np.random.default_rng(0).random((3, 5))
    pairwise = np.abs(x.ravel()[:, None] - x.ravel()[None, :]).sum() / (2 * x.size**2 * x.mean())
    assert stats.gini(torch.tensor(x, dtype=torch.float64)) == pytest.approx(pairwise)


def test_coefficient_of_variation():
    assert stats.coefficient_of_variation([2.0, 2.0, 2.0]) == 0.0
    assert stats.coefficient_of_variation([1.0, 3.0]) == pytest.approx(1.0 / 2.0)  # std 1 (ddof 0), mean 2
    assert math.isnan(stats.coefficient_of_variation([0.0, 0.0]))


def test_entropy():
    assert stats.entropy(np.ones(8)) == pytest.approx(math.log(8))
    assert stats.entropy(np.ones(8), normalized=True) == pytest.approx(1.0)
    assert stats.entropy([0.0, 5.0, 0.0]) == 0.0
    assert stats.entropy([1.0, 3.0]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_mse_and_correlations_vs_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.random((4, 6)), rng.random((4, 6))
    assert stats.mse(a, b) == pytest.approx(((a - b) ** 2).mean())
    assert stats.mse(torch.tensor(a), a) == 0.0
    assert stats.pearson(a, b) == pytest.approx(sps.pearsonr(a.ravel(), b.ravel())[0])
    assert stats.spearman(Pattern(torch.tensor(a)), b) == pytest.approx(sps.spearmanr(a.ravel(), b.ravel())[0],
                                                                        abs=1e-6)
    # spearman is rank-based: monotone transforms do not change it
    assert stats.spearman(a, np.exp(3 * a)) == pytest.approx(1.0)
    assert stats.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="shapes"):
        stats.mse(np.zeros((2, 3)), np.zeros((3, 2)))


def test_rank_heads_and_topk_jaccard():
    p = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.9, 0.0]])
    assert stats.rank_heads(p) == [(0, 1), (1, 1), (1, 0), (0, 2), (0, 0), (1, 2)]
    q = torch.tensor([[0.9, 0.8, 0.0], [0.0, 0.7, 0.0]])  # top3 = (0,0), (0,1), (1,1)
    # top-2: {(0,1),(1,1)} vs {(0,0),(0,1)} -> 1/3 ; top-3 adds (1,0) vs (1,1) -> {01,11,10} vs {00,01,11}: 2/4
    assert stats.topk_jaccard(p, q, 2) == pytest.approx(1 / 3)
    assert stats.topk_jaccard(p, q, 3) == pytest.approx(2 / 4)
    assert stats.topk_jaccard(p, p, 4) == 1.0
    with pytest.raises(ConfigError, match="between 1 and"):
        stats.topk_jaccard(p, q, 7)


def test_summary_and_nan_rejection():
    p = Pattern(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), {"model": "m"})
    s = stats.summary(p, top=2)
    assert s["shape"] == [2, 2] and s["gini"] == pytest.approx(0.75) and s["entropy"] == 0.0
    assert s["top_heads"][0] == [0, 0, 1.0] and s["max"] == 1.0 and s["layer_mean"] == [0.5, 0.0]
    with pytest.raises(ConfigError, match="NaN"):
        stats.gini([1.0, float("nan")])
