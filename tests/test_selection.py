import json

import numpy as np
import pytest
import torch

from lit_heads.errors import ConfigError
from lit_heads.heads.selection import (
    heads_to_mask,
    load_head_list,
    mask_to_heads,
    save_head_list,
    select_heads,
)

L, H = 3, 4


def _scores():
    # Distinct scores with a known order: head (l, h) scores l*H + h, except a planted maximum.
    s = torch.arange(L * H, dtype=torch.float32).reshape(L, H)
    s[0, 2] = 100.0
    return s


def test_top_picks_highest_scores_sorted():
    assert select_heads("top", L, H, top_k=3, scores=_scores()) == [(0, 2), (2, 2), (2, 3)]


def test_bottom_picks_lowest_scores():
    assert select_heads("bottom", L, H, top_k=3, scores=_scores()) == [(0, 0), (0, 1), (0, 3)]


def test_ties_are_broken_by_head_order():
    scores = torch.zeros(L, H)
    assert select_heads("top", L, H, top_k=2, scores=scores) == [(0, 0), (0, 1)]
    assert select_heads("bottom", L, H, top_k=2, scores=scores) == [(0, 0), (0, 1)]


def test_scores_accept_numpy_and_other_dtypes():
    s = _scores().double().numpy()
    assert select_heads("top", L, H, top_k=1, scores=s) == [(0, 2)]


@pytest.mark.parametrize(
    "fraction, expected",
    [(1.0, 12), (0.5, 6), (0.25, 3), (0.01, 1), (1 / 12 * 1.6, 2)],
)
def test_fraction_count(fraction, expected):
    assert len(select_heads("random", L, H, fraction=fraction)) == expected


def test_random_is_seeded_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = select_heads("random", L, H, top_k=5, seed=7)
    torch.rand(1000)  # consume the global RNG; the selection must not notice
    b = select_heads("random", L, H, top_k=5, seed=7)
    torch.manual_seed(12345)
    c = select_heads("random", L, H, top_k=5, seed=7)
    assert a == b == c
    assert a == sorted(a) and len(set(a)) == 5
    seeds = {tuple(select_heads("random", L, H, top_k=5, seed=s)) for s in range(10)}
    assert len(seeds) > 1  # the seed actually matters


def test_random_does_not_advance_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    select_heads("random", L, H, top_k=4, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_list_sorts_and_dedupes():
    heads = [(2, 1), (0, 3), (2, 1), np.array([1, 0]), torch.tensor([0, 0])]
    assert select_heads("list", L, H, heads=heads) == [(0, 0), (0, 3), (1, 0), (2, 1)]
    out = select_heads("list", L, H, heads=[(np.int64(1), np.int32(2))])
    assert out == [(1, 2)] and type(out[0][0]) is int


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(strategy="best", top_k=1), "top, bottom, random, list"),
        (dict(strategy="top", top_k=13, scores=torch.zeros(L, H)), "from 1 to 12"),
        (dict(strategy="top", top_k=0, scores=torch.zeros(L, H)), "from 1 to 12"),
        (dict(strategy="random", top_k=2.0), "integer"),
        (dict(strategy="random", top_k=True), "integer"),
        (dict(strategy="random", fraction=0.0), "greater than 0"),
        (dict(strategy="random", fraction=1.5), "at most 1"),
        (dict(strategy="random", fraction=float("nan")), "greater than 0"),
        (dict(strategy="random"), "exactly one of top_k"),
        (dict(strategy="random", top_k=2, fraction=0.5), "exactly one of top_k"),
        (dict(strategy="top", top_k=2), "no scores"),
        (dict(strategy="top", top_k=2, scores=torch.zeros(H, L)), "[4, 3]"),
        (dict(strategy="top", top_k=2, scores=torch.zeros(L * H)), "[3, 4]"),
        (dict(strategy="top", top_k=2, scores=torch.full((L, H), float("nan"))), "NaN"),
        (dict(strategy="list", heads=[(0, 1)], top_k=1), "Conflicting"),
        (dict(strategy="list", heads=[(0, 1)], fraction=0.5), "Conflicting"),
        (dict(strategy="top", heads=[(0, 1)], top_k=1, scores=torch.zeros(L, H)), "Conflicting"),
        (dict(strategy="list"), "needs a head list"),
        (dict(strategy="list", heads=[]), "empty"),
        (dict(strategy="list", heads=[(3, 0)]), "layer=3"),
        (dict(strategy="list", heads=[(0, 4)]), "head=4"),
        (dict(strategy="list", heads=[(-1, 0)]), "out of range"),
        (dict(strategy="list", heads=[(0, 1, 2)]), "(layer, head) pair"),
        (dict(strategy="list", heads=[(0.5, 1)]), "(layer, head) pair"),
    ],
)
def test_select_errors(kwargs, needle):
    strategy = kwargs.pop("strategy")
    with pytest.raises(ConfigError) as err:
        select_heads(strategy, L, H, **kwargs)
    assert needle in str(err.value)


def test_bad_dims():
    with pytest.raises(ConfigError, match="n_heads"):
        select_heads("random", 2, 0, top_k=1)


def test_mask_roundtrip():
    heads = [(0, 1), (2, 3)]
    mask = heads_to_mask(heads, L, H)
    assert mask.dtype == torch.bool and mask.shape == (L, H)
    assert mask.sum() == 2 and mask[0, 1] and mask[2, 3]
    assert mask_to_heads(mask) == heads
    with pytest.raises(ConfigError, match="out of range"):
        heads_to_mask([(0, H)], L, H)


@pytest.mark.parametrize("ext", [".npy", ".json", ".txt", ".csv"])
def test_save_load_roundtrip(tmp_path, ext):
    heads = [(2, 1), (0, 3), (1, 0)]
    path = save_head_list(tmp_path / f"heads{ext}", heads)
    assert load_head_list(path) == heads
    assert select_heads("list", L, H, heads=load_head_list(path)) == sorted(heads)


def test_load_lofit_style_npy(tmp_path):
    # LoFiT keeps heads as an integer array of (layer, head) rows; float arrays of whole numbers too.
    np.save(tmp_path / "a.npy", np.array([[5, 2], [0, 7]], dtype=np.int32))
    np.save(tmp_path / "b.npy", np.array([[5.0, 2.0]]))
    assert load_head_list(tmp_path / "a.npy") == [(5, 2), (0, 7)]
    assert load_head_list(tmp_path / "b.npy") == [(5, 2)]


def test_load_text_with_header_comments_and_spaces(tmp_path):
    p = tmp_path / "h.txt"
    p.write_text("# chosen by AP\nlayer,head\n\n0, 1\n2 3  # trailing comment\n")
    assert load_head_list(p) == [(0, 1), (2, 3)]


def test_load_json_dict_form(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps({"heads": [[1, 2]], "k": 1}))
    assert load_head_list(p) == [(1, 2)]


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("bad.txt", "0,1\n0,x\n", "bad.txt:2"),
        ("bad.csv", "0,1,2\n", "bad.csv:1"),
        ("bad.json", "[[0, 1], [2]]", "bad.json"),
        ("bad2.json", "{not json", "bad2.json"),
        ("bad.yaml", "- [0, 1]", "unsupported extension"),
    ],
)
def test_load_bad_files(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_head_list(p)
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_load_bad_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 3), dtype=np.int64))
    np.save(tmp_path / "b.npy", np.array([[0.5, 1.0]]))
    (tmp_path / "c.npy").write_bytes(b"not an array")
    for name, needle in [("a.npy", "[3, 3]"), ("b.npy", "non-integer"), ("c.npy", "Could not read")]:
        with pytest.raises(ConfigError) as err:
            load_head_list(tmp_path / name)
        assert needle in str(err.value) and name in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_head_list(tmp_path / "nope.npy")
