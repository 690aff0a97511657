"""Generated tasks, their checkers and the Python sandbox."""

import re

import pytest

from lit_heads.data import TASKS, Example, generate_task, is_checkable, is_correct, run_python
from lit_heads.data.tasks import program_text
from lit_heads.errors import DataError


def test_registry_describes_the_composition():
    assert {n for n, s in TASKS.items() if s.kind == "basic"} >= {"arithmetic", "code", "string"}
    assert TASKS["math_code"].kind == "complex"
    assert TASKS["math_code"].components == ("arithmetic", "code")
    for spec in TASKS.values():
        assert set(spec.components) <= set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_data_different_seed_different(name):
    a = generate_task(name, 30, seed=1)
    assert a == generate_task(name, 30, seed=1)
    assert [e.prompt for e in a] != [e.prompt for e in generate_task(name, 30, seed=2)]
    assert len({e.prompt for e in a}) == 30, "prompts within one draw are distinct"
    assert generate_task(name, 10, seed=1) == a[:10], "a prefix does not depend on n"
    assert all(e.task == name and e.answer for e in a)


def test_tasks_do_not_share_problems_under_one_seed():
    arithmetic = {e.prompt for e in generate_task("arithmetic", 50, 0)}
    math_code = {e.prompt.replace(" Write a Python program that prints the answer.",
                                  "") for e in generate_task("math_code", 50, 0)}
    assert not arithmetic & math_code


@pytest.mark.parametrize("name", ["arithmetic", "string"])
def test_text_checkers_accept_reference_and_reject_wrong(name):
    for example in generate_task(name, 40, seed=3):
        assert is_correct(example, example.response), example
        off = str(int(example.answer) + 1) if example.answer.isdigit() else example.answer[::-1] + "a"
        wrong = example.response.replace(f"Answer: {example.answer}", f"Answer: {off}")
        assert not is_correct(example, wrong), example
        assert not is_correct(example, "I do not know.")


def test_arithmetic_reference_is_a_worked_solution_with_correct_lines():
    for example in generate_task("arithmetic", 40, seed=4):
        *steps, last = example.response.splitlines()
        assert last == f"Answer: {example.answer}"
        for line in steps:
            left, op, right, _, result = line.split()
            assert eval(f"{left} {op} {right}") == int(result), line  # noqa: S307 - our own generated digits
        assert steps[-1].endswith(f"= {example.answer}")


@pytest.mark.parametrize("name", ["code", "math_code"])
def test_program_checkers_run_the_code(name):
    examples = generate_task(name, 8, seed=5)
    for example in examples:
        assert is_correct(example, example.response), example
        # Same program text, but printing something else: must be judged by its output.
        assert not is_correct(example, "print('nope')")
        assert not is_correct(example, "this is not python")
    # The answer text alone is not a program that prints the answer (unless it happens to be one).
    assert not is_correct(examples[0], f"Answer: {examples[0].answer}")


def test_math_code_program_shape_and_sandboxed_result():
    for example in generate_task("math_code", 10, seed=6):
        lines = example.response.splitlines()
        assert re.fullmatch(r"x1 = \d+ [-+*] \d+", lines[0])
        assert all(re.fullmatch(rf"x{i} = x{i - 1} [-+*] \d+", line) for i, line in enumerate(lines[1:-1], start=2))
        assert lines[-1] == f"print(x{len(lines) - 1})"
        assert run_python(example.response).stdout.strip() == example.answer
    example = Example("q", "", "12", "math_code")
    assert is_correct(example, "x1 = 3 * 4\nprint(x1)")
    assert is_correct(example, "```python\nx1 = 3 * 4\nprint(x1)\n```")
    assert not is_correct(example, "x1 = 3 * 5\nprint(x1)")
    assert not is_correct(example, "while True:\n    pass")  # timeout, not a hang
    # GSM8K programs divide: '12.0' is the answer 12, but printing it twice is not.
    assert is_correct(example, "x1 = 24 / 2\nprint(x1)")
    assert not is_correct(example, "print(12)\nprint(12)")
    assert not is_correct(Example("q", "", "abc", "code"), "print('ABC')")


def test_existing_tasks_generate_what_they_did_before_the_multistep_tasks():
    # Pinned from the code before multistep/multistep_code were added: a study quoted with these tasks
    # must regenerate the same samples, seed for seed.
    import hashlib
    import json

    pinned = {("arithmetic", 0): "a69c2881e3a50871", ("arithmetic", 42): "9a8abbd69d658cb5",
              ("code", 0): "b21b9536eb0029f6", ("code", 42): "808e3671efc23121",
              ("string", 0): "977dcef1b3eda15e", ("string", 42): "8cc7baebbddb7541",
              ("math_code", 0): "87fda2330113e30e", ("math_code", 42): "715e4ab44c508b5e"}
    for (name, seed), digest in pinned.items():
        rows = [[e.prompt, e.response, e.answer] for e in generate_task(name, 300, seed)]
        assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == digest, (name, seed)


def test_multistep_is_long_with_distractors_and_a_correct_worked_solution():
    examples = generate_task("multistep", 200, seed=8)
    for example in examples:
        *steps, last = example.response.splitlines()
        assert 4 <= len(steps) <= 5 and last == f"Answer: {example.answer}"
        value = None
        for line in steps:
            left, op, right, _, result = line.split()
            assert value is None or int(left) == value, line  # each step continues from the previous result
            exact = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right),
                     "/": int(left) / int(right)}[op]
            assert exact == int(result) and int(result) > 0, line  # division is exact, counts stay positive
            value = int(result)
        assert value == int(example.answer)
        # The start count and one operand per step, plus 1-2 distractor sentences with a number each.
        assert len(re.findall(r"\d+", example.prompt)) in (len(steps) + 2, len(steps) + 3), example.prompt
        assert is_correct(example, example.response)
        assert not is_correct(example, example.response.replace(f"Answer: {example.answer}", f"Answer: {value + 1}"))
    ops = {line.split()[1] for e in examples for line in e.response.splitlines()[:-1]}
    assert ops == {"+", "-", "*", "/"}
    assert max(int(e.answer) for e in examples) >= 100, "numbers larger than the short tasks'"


@pytest.mark.slow
def test_multistep_code_programs_run_to_the_answer_and_wrong_programs_fail():
    examples = generate_task("multistep_code", 60, seed=9)
    for example in examples:
        lines = example.response.splitlines()
        assert 5 <= len(lines) <= 6
        assert re.fullmatch(r"x1 = \d+ (\+|-|\*|//) \d+", lines[0])
        assert all(re.fullmatch(rf"x{i} = x{i - 1} (\+|-|\*|//) \d+", line) for i, line in enumerate(lines[1:-1],
                                                                                                     start=2))
        assert lines[-1] == f"print(x{len(lines) - 1})"
        assert run_python(example.response).stdout.strip() == example.answer
    example = examples[0]
    assert is_correct(example, example.response)
    assert is_correct(example, f"```python\n{example.response}\n```")
    assert is_correct(example, example.response.replace("//", "/"))  # '42.0' is the number 42
    last = example.response.splitlines()[-2]
    # One step with the wrong operation, or the print of an intermediate value, gives another number.
    wrong_op = last.replace(" + ", " - ") if " + " in last else last.replace(last.split()[3], "+", 1)
    assert not is_correct(example, example.response.replace(last, wrong_op))
    assert not is_correct(example,
                          example.response.replace(f"print(x{len(example.response.splitlines()) - 1})", "print(x1)"))
    assert not is_correct(example, f"Answer: {example.answer}")
    assert not is_correct(example, "print(")


def test_multistep_tasks_do_not_share_problems_under_one_seed():
    basic = {e.prompt for e in generate_task("multistep", 200, 0)}
    composite = {e.prompt.replace(" Write a Python program that prints the answer.",
                                  "") for e in generate_task("multistep_code", 200, 0)}
    assert not basic & composite
    assert TASKS["multistep_code"].components == ("multistep", "code") and TASKS["multistep"].kind == "basic"


def test_responses_are_short():
    # ~4 characters per token would put 160 characters near the 40-token budget.
    for name in TASKS:
        assert max(len(e.response) for e in generate_task(name, 200, seed=7)) < 120, name


def test_gsm8k_and_numeric_answers_compare_the_last_number():
    gsm = Example("q", "... #### 1000", "1000", "gsm8k")
    assert is_correct(gsm, "so she has 1,000 dollars.\n#### 1,000")
    assert is_correct(gsm, "The answer is 1000.0")
    assert not is_correct(gsm, "1000 then minus 1 gives 999")
    assert not is_correct(gsm, "no idea")
    assert is_correct(Example("q", "42", "42"), "It is 42.")


def test_custom_text_answers_use_normalized_exact_match():
    example = Example("Capital of France?", "Paris", "Paris")
    assert is_correct(example, "  paris. ")
    assert is_correct(example, "Answer: PARIS")
    assert not is_correct(example, "Lyon")
    assert not is_correct(example, "Paris or Lyon")


def test_ungradable_examples_are_flagged():
    example = Example("Write a poem", "Roses...", None, "custom", "poems.jsonl:4")
    assert not is_checkable(example)
    with pytest.raises(DataError, match=r"poems\.jsonl:4.*has no answer"):
        is_correct(example, "anything")
    assert is_checkable(generate_task("string", 1)[0])


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError,
                       match=r"Unknown generated task 'algebra'.*arithmetic \(basic\).*math_code \(complex\)"):
        generate_task("algebra", 3)


def test_sandbox_captures_output_and_contains_failures(tmp_path):
    ok = run_python("print(6 * 7)")
    assert ok.ok and ok.stdout == "42\n"
    crash = run_python("1/0")
    assert not crash.ok and "ZeroDivisionError" in crash.stderr
    loop = run_python("while True: pass", timeout_s=0.5)
    assert loop.timed_out and not loop.ok
    flood = run_python("while True: print('x' * 1000)")
    assert not flood.ok and len(flood.stdout) <= 64 * 1024
    # Runs in a throwaway directory, so relative writes do not land in the caller's directory.
    where = run_python("import os; open('f.txt', 'w').write('x'); print(os.getcwd())")
    assert where.ok and "lit_heads_sandbox_" in where.stdout
    assert not run_python("a\0b").ok


def test_program_text_prefers_a_fenced_block():
    assert program_text("Here:\n```python\nprint(1)\n```\nDone") == "print(1)\n"
    assert program_text("  print(2)\n") == "print(2)"
