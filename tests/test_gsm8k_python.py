import json
from pathlib import Path

import pytest

from lit_heads.data import gsm8k_python
from lit_heads.data.gsm8k_python import (
    MATH_CODE_INSTRUCTION,
    load_gsm8k_python,
    load_humaneval,
    program_output_matches,
    rewrite_solution,
)
from lit_heads.data.records import parse_gsm8k_answer
from lit_heads.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_rewrite_uses_earlier_results_as_variables():
    program = rewrite_solution(NATALIA)
    assert program == "x1 = 48 / 2\nx2 = 48 + x1\nprint(x2)"
    assert program_output_matches(program, "72")


def test_only_whole_numbers_are_replaced():
    # 4 is x1's value; the 4s inside 40 and 144, and the 44 inside 144, must stay literal.
    text = "a <<2*2=4>>4 b <<40+4=44>>44 c <<144-44=100>>100\n#### 100"
    assert rewrite_solution(text) == "x1 = 2 * 2\nx2 = 40 + x1\nx3 = 144 - x2\nprint(x3)"


def test_decimal_results_match_by_value_and_most_recent_wins():
    text = "<<12/60=0.2>>0.2 per minute, <<0.2*50=10>>10 dollars, <<5+5=10>>10 more, <<10*3=30>>30\n#### 30"
    assert rewrite_solution(text) == "x1 = 12 / 60\nx2 = x1 * 50\nx3 = 5 + 5\nx4 = x3 * 3\nprint(x4)"


def test_rounded_note_keeps_its_literal():
    # 3.33 is not the value of 10/3, so replacing it by x1 would change the arithmetic.
    text = "<<10/3=3.33>>3.33 each, so <<3.33*3=9.99>>9.99\n#### 9.99"
    program = rewrite_solution(text)
    assert program == "x1 = 10 / 3\nx2 = 3.33 * 3\nprint(x2)"
    assert program_output_matches(program, "9.99")


def test_program_ends_at_the_note_that_gives_the_answer():
    text = "He has <<5*4=20>>20 apples; with 3 more it would be <<20+3=23>>23.\n#### 20"
    assert rewrite_solution(text) == "x1 = 5 * 4\nprint(x1)"


def test_negative_answer_and_floor_division():
    text = "<<560//10=56>>56 then <<50-56=-6>>-6\n#### -6"
    program = rewrite_solution(text)
    assert program == "x1 = 560 // 10\nx2 = 50 - x1\nprint(x2)"
    assert program_output_matches(program, "-6")


@pytest.mark.parametrize(
    "text",
    [
        "No notes here, 2+3 = 5.\n#### 5",  # nothing to rewrite
        "<<2+3=5>>5 and then 5*2 = 10 in the text\n#### 10",  # the answer is not from a note
        "<<20%*50=10>>10\n#### 10",  # % is not translated: in Python it would be modulo
        "<<__import__('os').getpid()=1>>1\n#### 1",  # not arithmetic: never evaluated
        "<<5/0=0>>0\n#### 0",
        "<<2+3=5>>5\nno final line",
    ],
)
def test_solutions_that_cannot_be_rewritten_give_none(text):
    assert rewrite_solution(text) is None


def test_program_output_matches_checks_number_exit_and_timeout():
    assert program_output_matches("print(72.0)", "72")
    assert program_output_matches("print('working...')\nprint(1000)", "1,000")
    assert not program_output_matches("print(71)", "72")
    assert not program_output_matches("print(72)\nraise SystemExit(1)", "72")
    assert not program_output_matches("print('seventy-two')", "72")
    assert not program_output_matches("while True: pass", "72", timeout_s=0.5)
    with pytest.raises(DataError, match="not a number"):
        program_output_matches("print(1)", "many")


def test_load_keeps_checked_programs_and_counts_skips(tmp_path):
    path = _write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "How many clips?", "answer": NATALIA},
            {"question": "No notes?", "answer": "It is 5.\n#### 5"},
            {"question": "Big?", "answer": "<<500*2=1000>>1000\n#### 1,000"},
        ],
    )
    examples, skipped = load_gsm8k_python(path)
    assert skipped == 1
    assert [e.answer for e in examples] == ["72", "1000"]
    first = examples[0]
    assert first.prompt == f"How many clips?\n\n{MATH_CODE_INSTRUCTION}"
    assert first.response == "x1 = 48 / 2\nx2 = 48 + x1\nprint(x2)"
    assert first.task == "math_code"
    assert first.source == f"{path}:1"
    assert load_gsm8k_python(path, limit=1) == ([first], 0)


def test_programs_that_do_not_print_the_answer_are_skipped(tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": NATALIA}] * 3)
    programs = iter(["print(72)", "print(73)", "import os\nos._exit(0)"])
    monkeypatch.setattr(gsm8k_python, "_rewrite", lambda text: (next(programs), "ok"))
    # The third program kills the batch driver, which must fall back to one run per program.
    examples, skipped = load_gsm8k_python(path)
    assert [e.response for e in examples] == ["print(72)"]
    assert skipped == 2


def test_bad_rows_name_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": NATALIA}, {"question": "q"}])
    with pytest.raises(DataError, match=r"gsm\.jsonl:2.*'answer'"):
        load_gsm8k_python(path)
    nothing = _write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "no notes\n#### 3"}])
    with pytest.raises(DataError, match="none of its 1 rows"):
        load_gsm8k_python(nothing)


def test_load_humaneval_small_file(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n", "test": "",
           "entry_point": "f"}
    (example,) = load_humaneval(_write_jsonl(tmp_path / "he.jsonl", [row]))
    assert (example.prompt, example.response, example.answer, example.task) == ("def f(x):\n", "    return x\n", None,
                                                                                "humaneval")


def test_real_gsm8k_rows_are_rewritten_and_print_their_answer():
    path = DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"real GSM8K data not found at {path} (the shared data folder is outside this checkout)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:200]]
    rewritten = [rewrite_solution(row["answer"]) for row in rows]
    examples, skipped = load_gsm8k_python(path, limit=200)

    rate = len(examples) / len(rows)
    assert rate >= 0.8, f"only {rate:.1%} of the first 200 GSM8K rows were rewritten"
    # Every rewritten program passed the sandbox check: none was lost between rewrite and load.
    assert len(examples) == sum(p is not None for p in rewritten) == len(rows) - skipped
    by_line = {e.source: e for e in examples}
    for line, (row, program) in enumerate(zip(rows, rewritten), start=1):
        if program is not None:
            example = by_line[f"{path}:{line}"]
            assert example.response == program
            assert example.answer == parse_gsm8k_answer(row["answer"])
    # Independently of the loader's batched run, run a sample one by one.
    for example in examples[::10]:
        assert program_output_matches(example.response, example.answer), example.response


def test_real_humaneval():
    path = DATA / "humaneval" / "HumanEval.jsonl"
    if not path.is_file():
        pytest.skip(f"real HumanEval data not found at {path} (the shared data folder is outside this checkout)")
    examples = load_humaneval(path)
    assert len(examples) == 164
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert examples[0].prompt == first["prompt"]
    assert examples[0].response == first["canonical_solution"]
    assert {e.task for e in examples} == {"humaneval"} and {e.answer for e in examples} == {None}


def test_batches_respect_count_and_size_limits(monkeypatch):
    monkeypatch.setattr(gsm8k_python, "_BATCH_SIZE", 3)
    monkeypatch.setattr(gsm8k_python, "_BATCH_CHARS", 10)
    programs = ["aaaa", "bbbb", "cc", "dddd", "eeeeee", "f", "g" * 20, "h"]
    # At most 3 programs and 10 characters a batch, but a longer program still gets a batch of its own.
    assert gsm8k_python._batches(programs) == [["aaaa", "bbbb", "cc"], ["dddd", "eeeeee"], ["f"], ["g" * 20], ["h"]]
