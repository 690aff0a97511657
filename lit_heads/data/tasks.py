"""Generated tasks (no download, deterministic by seed) and the checkers that grade generations.

They mirror the paper's setting, basic tasks composed into a complex one:
  arithmetic  (basic)   short word problem, worked solution, final 'Answer: N' line
  code        (basic)   write a one-line Python program; graded by running it
  string      (basic)   reverse / sort / count letters of a made-up word; 'Answer: X'
  math_code   (complex, = arithmetic + code)  the arithmetic kind of word problem answered by a short
              Python program (`x1 = 3 + 4`, `x2 = x1 * 2`, `print(x2)`), graded by running it
  multistep   (basic)   longer word problem: 4-5 steps over +, -, *, / with two-digit numbers and 1-2
              distractor sentences; worked lines, then 'Answer: N'
  multistep_code (complex, = multistep + code)  the multistep kind of problem answered by a Python
              program; hard to learn from a few dozen samples (the paper's scarce-data regime)
`string` is a basic task math_code and multistep_code do not need, a control for composition studies.

Responses of the short tasks stay under ~40 tokens so generation during validation is cheap and a 135M
model learns the format within ~100 steps; multistep responses run to ~60 tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from lit_heads.data.records import Example, extract_final_number
from lit_heads.data.sandbox import run_python
from lit_heads.errors import DataError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "basic" or "complex"
    components: tuple[str, ...]  # the basic tasks a complex task is made of; () for basic ones
    description: str
    make: Callable[[random.Random], Example]  # one example from the generator's random state
    check: Callable[[Example, str], bool]  # (example, generated text) -> correct?


# ---------------------------------------------------------------- shared pieces of the generators

_NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Max",
          "Nora", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]
_ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells", "stickers",
          "cookies", "buttons", "eggs"]
_ADD = ["{name} buys {b} more {item}.", "{name} finds {b} more {item}.", "A friend gives {name} {b} more {item}."]
_SUB = ["{name} gives away {b} {item}.", "{name} loses {b} {item}.", "{name} sells {b} {item}."]
_MUL = ["{name} then gets {b} times as many {item} as before."]


def _word_problem(rng: random.Random) -> tuple[str, list[tuple[int, str, int, int]], int]:
    """A 2-3 step problem: (text, steps as (left, op, right, result), answer). Numbers stay small so a
    worked solution fits in ~35 tokens; at most one multiplication keeps results under a few hundred."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    used_mul = False
    for _ in range(rng.randint(2, 3)):
        choices = ["+", "-"] + ([] if used_mul else ["*"])
        # Subtracting from 1 would leave nothing; keep every intermediate count positive.
        op = rng.choice(choices) if value > 1 else "+"
        if op == "+":
            b, template = rng.randint(2, 15), rng.choice(_ADD)
            new = value + b
        elif op == "-":
            b, template = rng.randint(1, value - 1), rng.choice(_SUB)
            new = value - b
        else:
            b, template, used_mul = rng.randint(2, 3), rng.choice(_MUL), True
            new = value * b
        sentences.append(template.format(name=name, item=item, b=b))
        steps.append((value, op, b, new))
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), steps, value


# The multistep problems: more steps, bigger numbers, four operations with several phrasings each, and
# distractor sentences whose numbers must not be used. Every phrasing of an operation maps to one line
# of the solution, so the skill is reading the problem, which the basic and the complex task share.
_LONG_ADD = ["{name} buys {b} more {item}.", "{other} gives {name} {b} {item}.", "{name} wins {b} {item} at a fair.",
             "{name} collects another {b} {item}."]
_LONG_SUB = ["{name} gives {b} {item} to {other}.", "{name} sells {b} of the {item}.", "{name} loses {b} {item}.",
             "{name} uses up {b} {item}."]
_LONG_MUL = ["{name} ends up with {b} times as many {item} as before.",
             "The number of {item} {name} has grows {b}-fold."]
_LONG_DIV = ["{name} splits the {item} equally into {b} boxes and keeps only one box.",
             "{name} shares the {item} equally among {b} people, {name} included, and keeps one share."]
_DISTRACTORS = ["{other} has {d} {other_item}.", "{name} is {d} years old.", "{other} buys {d} {item}.",
                "The shop sells {other_item} in packs of {d}.", "{name} walks {d} minutes to school."]


def _long_word_problem(rng: random.Random) -> tuple[str, list[tuple[int, str, int, int]], int]:
    """A 4-5 step problem on one person's count with 1-2 distractors: (text, steps as (left, op, right,
    result), answer). Division is exact, at most one multiplication, and every count stays positive."""
    name, other = rng.sample(_NAMES, 2)
    item, other_item = rng.sample(_ITEMS, 2)
    value = rng.randint(12, 60)
    events, steps, used_mul = [], [], False
    for _ in range(rng.randint(4, 5)):
        divisors = [k for k in range(2, 7) if value % k == 0 and value // k >= 2]
        ops = (["+"] + (["-"] if value > 3 else []) + ([] if used_mul or value > 150 else ["*"])
               + (["/"] if divisors else []))
        op = rng.choice(ops)
        if op == "+":
            b, template = rng.randint(11, 99), rng.choice(_LONG_ADD)
            new = value + b
        elif op == "-":
            b, template = rng.randint(1, value - 2), rng.choice(_LONG_SUB)
            new = value - b
        elif op == "*":
            b, template, used_mul = rng.randint(2, 5), rng.choice(_LONG_MUL), True
            new = value * b
        else:
            b, template = rng.choice(divisors), rng.choice(_LONG_DIV)
            new = value // b
        events.append(template.format(name=name, other=other, item=item, b=b))
        steps.append((value, op, b, new))
        value = new
    for _ in range(rng.randint(1, 2)):
        distractor = rng.choice(_DISTRACTORS).format(name=name, other=other, item=item, other_item=other_item,
                                                     d=rng.randint(3, 40))
        events.insert(rng.randint(0, len(events)), distractor)
    sentences = [f"{name} has {steps[0][0]} {item}.", *events, f"How many {item} does {name} have now?"]
    return " ".join(sentences), steps, value


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    # Made-up words give a huge space of distinct examples and cannot be answered from memory.
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _final_answer_text(text: str) -> str:
    """What follows the last 'Answer:' (the whole text when there is none), first line only."""
    if "Answer:" in text:
        text = text.rsplit("Answer:", 1)[1]
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def program_text(generated: str) -> str:
    """The program in a generation: the body of a ``` fence when there is one, else the whole text."""
    match = _FENCE.search(generated)
    return match.group(1) if match else generated.strip()


def _numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
    except InvalidOperation:
        return False


def _is_number(text: str | None) -> bool:
    return text is not None and extract_final_number(text) == text.replace(",", "")


def _normalize(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?\"'")


# ---------------------------------------------------------------- checkers


def check_final_number(example: Example, generated: str) -> bool:
    """Correct when the last number in the generation equals the answer numerically ('18.0' == '18')."""
    return _numbers_equal(extract_final_number(generated), example.answer)


def check_answer_line(example: Example, generated: str) -> bool:
    """Correct when the text after the last 'Answer:' is exactly the answer."""
    return _final_answer_text(generated) == example.answer


def check_program_output(example: Example, generated: str) -> bool:
    """Correct when the generated program runs (sandboxed) and prints exactly the answer; a numeric
    answer also accepts the same number written differently (a GSM8K program with `/` prints '18.0')."""
    result = run_python(program_text(generated))
    printed = result.stdout.strip()
    if not result.ok:
        return False
    return printed == example.answer or (_is_number(example.answer) and _numbers_equal(printed, example.answer))


# ---------------------------------------------------------------- generators


def _worked(text: str, steps: list[tuple[int, str, int, int]], answer: int, task: str) -> Example:
    """A word problem answered by one worked line per step (`12 + 5 = 17`), then 'Answer: N'."""
    lines = [f"{a} {op} {b} = {c}" for a, op, b, c in steps]
    return Example(text, "\n".join(lines + [f"Answer: {answer}"]), str(answer), task)


def _make_arithmetic(rng: random.Random) -> Example:
    return _worked(*_word_problem(rng), "arithmetic")


def _as_program(text: str, steps: list[tuple[int, str, int, int]], answer: int, task: str) -> Example:
    """A word problem answered by a program: one assignment per step (`x2 = x1 * 2`), then `print`.
    Division is exact in the generators, so it is written as integer division and prints an integer."""
    lines = []
    for i, (a, op, b, _) in enumerate(steps, start=1):
        left = str(a) if i == 1 else f"x{i - 1}"
        lines.append(f"x{i} = {left} {'//' if op == '/' else op} {b}")
    lines.append(f"print(x{len(steps)})")
    prompt = f"{text} Write a Python program that prints the answer."
    return Example(prompt, "\n".join(lines), str(answer), task)


def _make_math_code(rng: random.Random) -> Example:
    return _as_program(*_word_problem(rng), "math_code")


def _make_multistep(rng: random.Random) -> Example:
    return _worked(*_long_word_problem(rng), "multistep")


def _make_multistep_code(rng: random.Random) -> Example:
    return _as_program(*_long_word_problem(rng), "multistep_code")


def _make_code(rng: random.Random) -> Example:
    # Each template: (instruction, program, exact stdout). Arithmetic is kept out on purpose so the
    # code task is "Python syntax and builtins" and not a second math task.
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    word = _pseudo_word(rng)
    words = [_pseudo_word(rng) for _ in range(rng.randint(2, 3))]
    k = rng.randint(2, 4)
    templates = [
        (f"prints the list {numbers} sorted", f"print(sorted({numbers}))", str(sorted(numbers))),
        (f"prints the largest number in {numbers}", f"print(max({numbers}))", str(max(numbers))),
        (f"prints the word {word!r} in upper case", f"print({word!r}.upper())", word.upper()),
        (f"prints the word {word!r} {k} times in a row", f"print({word!r} * {k})", word * k),
        (f"prints the words {words} joined with '-'", f"print('-'.join({words}))", "-".join(words)),
        (f"prints how many items the list {numbers} has", f"print(len({numbers}))", str(len(numbers))),
    ]
    instruction, program, output = rng.choice(templates)
    return Example(f"Write a Python program that {instruction}.", program, output, "code")


def _make_string(rng: random.Random) -> Example:
    word = _pseudo_word(rng)
    letter = rng.choice(word)
    templates = [
        (f"Reverse the letters of the word '{word}'.", word[::-1]),
        (f"Sort the letters of the word '{word}' alphabetically.", "".join(sorted(word))),
        (f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))),
    ]
    prompt, answer = rng.choice(templates)
    return Example(prompt, f"Answer: {answer}", answer, "string")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("arithmetic", "basic", (), "2-3 step word problem; worked lines then 'Answer: N'", _make_arithmetic,
                 check_final_number),
        TaskSpec("code", "basic", (), "one-line Python program using builtins; graded by its output", _make_code,
                 check_program_output),
        TaskSpec("string", "basic", (), "reverse / sort / count letters of a made-up word; 'Answer: X'", _make_string,
                 check_answer_line),
        TaskSpec("math_code", "complex", ("arithmetic", "code"),
                 "word problem answered by a Python program that prints the result", _make_math_code,
                 check_program_output),
        TaskSpec("multistep", "basic", (), "4-5 step word problem with distractors; worked lines then 'Answer: N'",
                 _make_multistep, check_final_number),
        TaskSpec("multistep_code", "complex", ("multistep", "code"),
                 "multistep word problem answered by a Python program that prints the result", _make_multistep_code,
                 check_program_output),
    ]
}


def _task_list() -> str:
    return ", ".join(f"{s.name} ({s.kind})" for s in TASKS.values())


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"Unknown generated task '{name}'. Known tasks: {_task_list()}.")
    return TASKS[name]


def generate_task(name: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of task `name`; the same (name, n, seed) always gives the same list, and
    the first k examples do not depend on n (so a validation prefix stays fixed when n grows)."""
    spec = get_task(name)
    if n < 0:
        raise DataError(f"Cannot generate {n} examples of '{name}'; give a count >= 0.")
    # The task name is part of the seed so arithmetic and math_code do not share their problems.
    rng = random.Random(f"{name}:{seed}")
    examples: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise DataError(f"Task '{name}' produced only {len(examples)} distinct examples of the {n} asked; ask for "
                            "fewer.")
        example = spec.make(rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        examples.append(Example(example.prompt, example.response, example.answer, example.task,
                                f"generated:{name}(seed={seed})#{len(examples)}"))
    return examples


def is_checkable(example: Example) -> bool:
    """Whether `is_correct` can grade this example (a generated task, or any example with an answer)."""
    return example.task in TASKS or example.answer is not None


def is_correct(example: Example, generated_text: str) -> bool:
    """Grade a generation (the model's continuation after the prompt, special tokens removed).

    Generated tasks use their own checker. 'gsm8k' examples, and others whose answer is a number,
    compare the last number in the generation with the answer numerically. Other examples with an
    answer use a normalized exact match (case, spacing and surrounding punctuation ignored) on the text
    after the last 'Answer:', or the whole generation when it has none.
    """
    spec = TASKS.get(example.task)
    if spec is not None:
        return spec.check(example, generated_text)
    if example.answer is None:
        raise DataError(
            f"Example {example.source or ''} (task '{example.task}') has no answer, so a generation cannot be graded. "
            f"Add an 'answer' field to the data, or skip it (see is_checkable)."
        )
    if example.task == "gsm8k" or _is_number(example.answer):
        return check_final_number(example, generated_text)
    return _normalize(_final_answer_text(generated_text)) == _normalize(example.answer)


__all__ = ["TASKS", "TaskSpec", "generate_task", "get_task", "is_correct", "is_checkable", "program_text",
           "check_final_number", "check_answer_line", "check_program_output"]
