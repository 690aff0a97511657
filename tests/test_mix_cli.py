"""`lit_heads mix`: α (inline, flat JSON or compose.json) + pools (files or generated tasks) -> JSONL."""

import json
from collections import Counter

import pytest

from lit_heads.analysis.mix import mix_counts
from lit_heads.cli import main as cli_main
from lit_heads.commands.mix import mix, read_alpha
from lit_heads.data import generate_task, load_examples
from lit_heads.data.records import example_to_record
from lit_heads.errors import ConfigError, DataError


def _tasks(path):
    return Counter(json.loads(line)["task"] for line in path.read_text().splitlines())


def test_mix_from_compose_json_has_the_alpha_proportions(tmp_path):
    compose_json = tmp_path / "compose.json"
    compose_json.write_text(json.dumps({"fits": {"nnls": {"alpha": {"arithmetic": 0.6, "code": 0.2}, "r2": 0.9},
                                                 "lstsq": {"alpha": {"arithmetic": 0.7, "code": -0.1}, "r2": 0.95}}}))
    out = tmp_path / "mix.jsonl"
    cli_main(["mix", "--alpha", str(compose_json), "--pools", "arithmetic=generated:arithmetic,code=generated:code",
              "--n", "40", "--output", str(out)])
    assert _tasks(out) == {"arithmetic": 30, "code": 10}
    examples = load_examples(out)  # the mix is ordinary training data
    assert len(examples) == 40 and len({e.prompt for e in examples}) == 40
    assert all(e.answer for e in examples)


def test_lstsq_alpha_with_negative_weight_is_clipped_or_abs(tmp_path):
    compose_json = tmp_path / "compose.json"
    compose_json.write_text(json.dumps({"fits": {"lstsq": {"alpha": {"arithmetic": 0.75, "code": -0.25}}}}))
    clipped = mix(str(compose_json), "arithmetic=generated:arithmetic,code=generated:code", n=12, method="lstsq",
                  output=str(tmp_path / "clip.jsonl"))
    assert clipped["counts"] == {"arithmetic": 12, "code": 0}
    assert _tasks(tmp_path / "clip.jsonl") == {"arithmetic": 12}
    absolute = mix("arithmetic=0.75,code=-0.25", "arithmetic=generated:arithmetic,code=generated:code", n=12,
                   rule="abs",
                   output=str(tmp_path / "abs.jsonl"))
    assert absolute["counts"] == {"arithmetic": 9, "code": 3}
    assert _tasks(tmp_path / "abs.jsonl") == {"arithmetic": 9, "code": 3}


def test_pools_from_files_and_seeded_draw(tmp_path):
    pool = tmp_path / "math.jsonl"
    pool.write_text("".join(json.dumps(example_to_record(e)) + "\n" for e in generate_task("arithmetic", 30, 7)))
    flat = tmp_path / "alpha.json"
    flat.write_text(json.dumps({"math": 1.0, "string": 1.0}))
    a = mix(str(flat), f"math={pool},string=generated:string", n=10, seed=3, output=str(tmp_path / "a.jsonl"))
    mix(str(flat), f"math={pool},string=generated:string", n=10, seed=3, output=str(tmp_path / "b.jsonl"))
    assert a["counts"] == mix_counts({"math": 1.0, "string": 1.0}, 10) == {"math": 5, "string": 5}
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    file_prompts = {e.prompt for e in generate_task("arithmetic", 30, 7)}
    drawn = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sum(r["prompt"] in file_prompts for r in drawn) == 5


def test_read_alpha_forms_and_errors(tmp_path):
    assert read_alpha("a=0.5, b=-1") == {"a": 0.5, "b": -1.0}
    with pytest.raises(ConfigError, match="not a number"):
        read_alpha("a=high")
    with pytest.raises(ConfigError, match="does not exist"):
        read_alpha(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fits": {"lstsq": {"alpha": {"a": 1}}}}))
    with pytest.raises(ConfigError, match="not 'nnls'"):
        read_alpha(str(bad))
    bad.write_text(json.dumps(["a", 1]))
    with pytest.raises(DataError):
        read_alpha(str(bad))


def test_missing_pool_and_all_negative_alpha_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"needs samples of \['code'\]"):
        mix("arithmetic=1,code=1", "arithmetic=generated:arithmetic", n=4, output=str(tmp_path / "m.jsonl"))
    with pytest.raises(ConfigError, match="No task has a positive mix weight"):
        mix("arithmetic=-1", "arithmetic=generated:arithmetic", n=4, output=str(tmp_path / "m.jsonl"))
    assert not (tmp_path / "m.jsonl").exists()
