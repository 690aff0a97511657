import json
import stat
from collections import Counter

import pytest

from lit_heads.analysis import mix as mix_module
from lit_heads.analysis.mix import build_mix, mix_counts, write_jsonl
from lit_heads.data.readers import load_examples
from lit_heads.data.records import Example
from lit_heads.errors import ConfigError, DataError


def _pools(sizes):
    return {
        task: [Example(f"{task} q{i}", f"{task} r{i}", str(i), task) for i in range(size)]
        for task, size in sizes.items()
    }


def test_counts_follow_alpha_and_sum_to_n():
    assert mix_counts({"math": 0.7, "code": 0.3}, 100) == {"math": 70, "code": 30}
    # Unnormalised weights: shares are 2/6, 3/6, 1/6 of 10 = 3.33, 5, 1.67 -> the spare one goes
    # to the largest remainder (0.67 of "c").
    assert mix_counts({"a": 2.0, "b": 3.0, "c": 1.0}, 10) == {"a": 3, "b": 5, "c": 2}


@pytest.mark.parametrize("n", [0, 1, 7, 99, 1000])
def test_largest_remainder_is_within_one_of_the_quota(n):
    alpha = {"a": 0.123, "b": 0.456, "c": 0.2, "d": 0.221}
    counts = mix_counts(alpha, n)
    assert sum(counts.values()) == n
    total = sum(alpha.values())
    for task, a in alpha.items():
        assert abs(counts[task] - n * a / total) < 1


def test_ties_are_broken_by_name_not_dict_order():
    assert mix_counts({"b": 1.0, "a": 1.0, "c": 1.0}, 4) == {"b": 1, "a": 2, "c": 1}
    assert mix_counts({"c": 1.0, "a": 1.0, "b": 1.0}, 4) == {"c": 1, "a": 2, "b": 1}


def test_clip_drops_negative_weights_and_abs_keeps_their_size():
    alpha = {"math": 0.9, "code": 0.3, "chat": -0.3}
    assert mix_counts(alpha, 12, rule="clip") == {"math": 9, "code": 3, "chat": 0}
    assert mix_counts(alpha, 15, rule="abs") == {"math": 9, "code": 3, "chat": 3}


def test_no_positive_weight_is_an_error():
    with pytest.raises(ConfigError, match="rule='abs'"):
        mix_counts({"a": -1.0, "b": 0.0}, 10, rule="clip")
    with pytest.raises(ConfigError, match="positive"):
        mix_counts({"a": 0.0}, 10, rule="abs")


@pytest.mark.parametrize(
    "alpha, n, rule, match",
    [
        ({"a": 1.0}, 10, "softmax", "clip, abs"),
        ({"a": 1.0}, -1, "clip", "non-negative integer"),
        ({"a": 1.0}, 2.5, "clip", "non-negative integer"),
        ({}, 10, "clip", "no weights"),
        ({"a": float("nan")}, 10, "clip", "finite"),
    ],
)
def test_bad_arguments_are_config_errors(alpha, n, rule, match):
    with pytest.raises(ConfigError, match=match):
        mix_counts(alpha, n, rule=rule)


def test_build_mix_draws_without_replacement_in_proportion():
    pools = _pools({"math": 50, "code": 50, "chat": 50})
    mixed = build_mix({"math": 0.6, "code": 0.4, "chat": -0.2}, pools, n=40, seed=1)
    assert len(mixed) == 40
    assert Counter(e.task for e in mixed) == {"math": 24, "code": 16}
    assert len(set(mixed)) == 40  # no duplicates
    assert all(e in pools[e.task] for e in mixed)
    # Shuffled: the tasks are interleaved, not in two blocks.
    first_half = Counter(e.task for e in mixed[:20])
    assert first_half["math"] and first_half["code"]


def test_build_mix_is_deterministic_by_seed():
    pools = _pools({"math": 30, "code": 30})
    alpha = {"math": 0.5, "code": 0.5}
    assert build_mix(alpha, pools, 20, seed=3) == build_mix(alpha, pools, 20, seed=3)
    assert build_mix(alpha, pools, 20, seed=3) != build_mix(alpha, pools, 20, seed=4)
    # The pools' dict order does not change the result.
    reordered = {"code": pools["code"], "math": pools["math"]}
    assert build_mix(alpha, reordered, 20, seed=3) == build_mix(alpha, pools, 20, seed=3)


def test_small_pool_is_repeated_evenly_with_a_warning():
    pools = _pools({"math": 3, "code": 100})
    with pytest.warns(UserWarning, match="'math' needs 8 samples but its pool has 3"):
        mixed = build_mix({"math": 0.8, "code": 0.2}, pools, n=10, seed=0)
    copies = Counter(e for e in mixed if e.task == "math")
    assert sum(copies.values()) == 8
    assert sorted(copies.values()) == [2, 3, 3]  # 8 = 2 full passes + 2 more, never 4 of one


def test_dict_records_get_their_pool_name_as_task():
    pools = {"math": [{"prompt": "p", "response": "r"}], "code": [{"prompt": "q", "response": "s", "task": "py"}]}
    mixed = build_mix({"math": 1.0, "code": 1.0}, pools, n=2, seed=0)
    assert sorted(r["task"] for r in mixed) == ["math", "py"]


def test_missing_or_empty_pool_is_reported():
    with pytest.raises(ConfigError, match=r"\['code'\].*pools: \['math'\]"):
        build_mix({"math": 1.0, "code": 1.0}, _pools({"math": 5}), n=4)
    with pytest.raises(DataError, match="'code' is empty"):
        build_mix({"math": 1.0, "code": 1.0}, {"math": _pools({"math": 5})["math"], "code": []}, n=4)


def test_jsonl_reads_back_identically(tmp_path):
    records = build_mix({"math": 0.5, "code": 0.5}, _pools({"math": 10, "code": 10}), n=8, seed=0)
    records.append(Example("chat prompt ünïcode\n\"quoted\"", "reply", None, "chat"))
    path = write_jsonl(records, tmp_path / "sub" / "mix.jsonl")

    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [sorted(r) for r in raw] == [["answer", "prompt", "response", "task"]] * 9
    assert raw[-1] == {"prompt": "chat prompt ünïcode\n\"quoted\"", "response": "reply", "answer": None, "task": "chat"}
    # The project's own reader sees the prompt_response format and gives back the same examples.
    assert load_examples(path) == records
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkstemp's 0600


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "mix.jsonl"
    write_jsonl([{"prompt": "old", "response": "old"}], path)
    before = path.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mix_module.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl([{"prompt": "new", "response": "new"}], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mix.jsonl"]  # no temp file left behind


def test_bad_record_is_rejected_before_writing(tmp_path):
    path = tmp_path / "mix.jsonl"
    with pytest.raises(DataError, match="Record 1 needs a string 'response'"):
        write_jsonl([{"prompt": "p", "response": "r"}, {"prompt": "p"}], path)
    assert not path.exists()
