"""GSM8K solved with Python ("math_code"), and HumanEval ("humaneval"): real data for the composite
task of the paper (math-with-code ≈ math + code, arXiv 2409.15820).

A GSM8K solution marks each calculation with a calculator note, `<<48/2=24>>`. Each note becomes one
line of a straight-line program, and a literal that equals an earlier line's value becomes that
line's variable, so the program shows how the steps depend on each other:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.          x1 = 48 / 2
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether.     x2 = 48 + x1
    #### 72                                                   print(x2)

Only whole number tokens are matched (the expression is parsed, so the 4 inside 48 is never touched),
and only when the earlier line's *computed* value equals the literal, so a note rounded in the text
(`<<10/3=3.33>>`, then `3.33*3`) keeps its literal and the program still does the arithmetic the
solution did. The program prints the last note whose value is the final `#### N` answer; lines after
it do not contribute and are dropped. A solution is skipped (and counted) when it has no notes, a
note is not plain arithmetic (+ - * / // and parentheses; GSM8K's notes need nothing else, so no
symbol such as % or × is translated), no note's value is the answer, or the program, run in the
sandbox, does not print the answer.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
from collections import Counter
from pathlib import Path
from typing import Callable

from lit_heads.data.readers import read_records
from lit_heads.data.records import Example, parse_gsm8k_answer
from lit_heads.data.sandbox import run_python
from lit_heads.errors import DataError

log = logging.getLogger(__name__)

MATH_CODE_TASK = "math_code"
HUMANEVAL_TASK = "humaneval"
MATH_CODE_INSTRUCTION = "Answer with a short Python program that computes the answer and prints it."

_NOTE_START, _NOTE_END = "<<", ">>"
_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _same_number(a: float, b: float) -> bool:
    # Tight enough that a rounded note (3.33 for 10/3) is a different number, loose enough for
    # float noise (0.1 + 0.2).
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _evaluate(node: ast.AST, env: dict[str, float]) -> float:
    """Value of an arithmetic expression tree; ValueError for anything that is not plain arithmetic.

    Computed in-process with Python's own operators (so it agrees with the program's output) but
    only after checking every node, so no note can run code.
    """
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, env)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, env))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")


class _UseEarlierResults(ast.NodeTransformer):
    """Replace each number literal equal to an earlier line's value with that line's name (the most
    recent one when several match)."""

    def __init__(self, earlier: list[tuple[str, float]]):
        self.earlier = earlier

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        for name, value in reversed(self.earlier):
            if _same_number(node.value, value):
                return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
        return node


def _calculator_notes(text: str) -> list[str]:
    notes, start = [], text.find(_NOTE_START)
    while start != -1:
        end = text.find(_NOTE_END, start)
        if end == -1:
            break
        notes.append(text[start + len(_NOTE_START) : end])
        start = text.find(_NOTE_START, end)
    return notes


def _rewrite(answer_text: str) -> tuple[str | None, str]:
    """(program, "ok") or (None, why it cannot be rewritten)."""
    target = _parse_number(parse_gsm8k_answer(answer_text))
    if target is None:
        return None, "no numeric '#### N' answer"
    notes = _calculator_notes(answer_text)
    if not notes:
        return None, "no calculator notes"

    lines: list[str] = []
    earlier: list[tuple[str, float]] = []
    answer_line = None
    for note in notes:
        # The note's stated result (after '=') is ignored: the program's own value is what counts.
        expression = note.split("=", 1)[0]
        try:
            tree = ast.parse(expression.strip(), mode="eval")
            _evaluate(tree, {})  # reject non-arithmetic before rewriting anything
            tree = _UseEarlierResults(earlier).visit(tree)
            value = _evaluate(tree, dict(earlier))
        except (SyntaxError, ValueError, ArithmeticError):
            return None, "a note is not plain arithmetic"
        name = f"x{len(lines) + 1}"
        lines.append(f"{name} = {ast.unparse(tree)}")
        earlier.append((name, value))
        if _same_number(value, target):
            answer_line = len(lines)
    if answer_line is None:
        return None, "no note computes the final answer"
    return "\n".join(lines[:answer_line] + [f"print(x{answer_line})"]), "ok"


def rewrite_solution(answer_text: str) -> str | None:
    """The Python program for a GSM8K solution (its `answer` field), or None if it cannot be
    rewritten (see the module docstring). The program is not run here; see `program_output_matches`."""
    return _rewrite(answer_text)[0]


def _output_matches(stdout: str | None, answer: float) -> bool:
    lines = (stdout or "").strip().splitlines()
    printed = _parse_number(lines[-1]) if lines else None
    return printed is not None and _same_number(printed, answer)


def _answer_number(answer: str | float) -> float:
    value = _parse_number(str(answer))
    if value is None:
        raise DataError(
            f"The expected answer {answer!r} is not a number; program_output_matches compares a program's "
            f"printed number with a numeric answer such as '72' or '1,000'."
        )
    return value


def program_output_matches(program_text: str, answer: str | float, timeout_s: float = 2.0) -> bool:
    """True when `program_text`, run in the sandbox (`python -I`, timeout, resource limits), exits
    cleanly and the last line it prints is the number `answer` (commas allowed, 72 == 72.0)."""
    expected = _answer_number(answer)
    result = run_python(program_text, timeout_s=timeout_s)
    return result.ok and _output_matches(result.stdout, expected)


# Starting one sandboxed interpreter per program costs ~40 ms, minutes for all of GSM8K; the loader
# therefore runs its own generated programs (straight-line arithmetic, already checked node by node)
# in batches, each program in a fresh namespace, inside one sandboxed process.
_BATCH_SIZE = 100
_BATCH_CHARS = 50_000  # the driver travels as one argv string, which Linux caps at 128 KiB
_BATCH_DRIVER = """
import contextlib, io, json
outputs = []
for program in json.loads({programs!r}):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            exec(program, {{}})
        outputs.append(buffer.getvalue())
    except Exception:
        outputs.append(None)
print(json.dumps(outputs))
"""


def _batches(programs: list[str]) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    size = 0
    for program in programs:
        if batches[-1] and (len(batches[-1]) == _BATCH_SIZE or size + len(program) > _BATCH_CHARS):
            batches.append([])
            size = 0
        batches[-1].append(program)
        size += len(program)
    return [batch for batch in batches if batch]


def _run_batch(programs: list[str]) -> list[str | None]:
    """stdout of each program (None where it failed), run in the sandbox."""
    outputs: list[str | None] = []
    for chunk in _batches(programs):
        result = run_python(_BATCH_DRIVER.format(programs=json.dumps(chunk)), timeout_s=5.0)
        try:
            chunk_outputs = json.loads(result.stdout) if result.ok else None
        except json.JSONDecodeError:
            chunk_outputs = None
        if not isinstance(chunk_outputs, list) or len(chunk_outputs) != len(chunk):
            # Something in the batch broke the driver; fall back to one sandbox run per program.
            chunk_outputs = []
            for program in chunk:
                single = run_python(program)
                chunk_outputs.append(single.stdout if single.ok else None)
        outputs.extend(chunk_outputs)
    return outputs


def _text_field(record: object, key: str, where: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: expected a string field '{key}' (record keys: {keys}); is this the right file?")
    return value


def load_gsm8k_python(path: str | Path, limit: int | None = None) -> tuple[list[Example], int]:
    """GSM8K (JSONL with `question`, `answer`) as "math_code" examples, and how many rows were skipped.

    Each example's prompt is the question plus `MATH_CODE_INSTRUCTION`, its response the program from
    `rewrite_solution`, its answer the final number ('1,000' -> '1000'). Only programs that print the
    answer when run in the sandbox are kept. `limit` reads only the first `limit` rows.
    """
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    rows, reasons = [], Counter()
    for record, where in records:
        question = _text_field(record, "question", where)
        solution = _text_field(record, "answer", where)
        program, why = _rewrite(solution)
        if program is None:
            reasons[why] += 1
        else:
            rows.append((question, program, parse_gsm8k_answer(solution), where))

    outputs = _run_batch([program for _, program, _, _ in rows])
    examples = []
    for (question, program, answer, where), stdout in zip(rows, outputs):
        if _output_matches(stdout, _answer_number(answer)):
            prompt = f"{question}\n\n{MATH_CODE_INSTRUCTION}"
            examples.append(Example(prompt, program, answer, MATH_CODE_TASK, where))
        else:
            reasons["program does not print the answer"] += 1
    skipped = sum(reasons.values())
    log.info("GSM8K -> Python: kept %d of %d rows from %s; skipped %s", len(examples), len(records), path,
             dict(reasons))
    if not examples:
        raise DataError(
            f"{path}: none of its {len(records)} rows could be rewritten as a Python program "
            f"({dict(reasons)}). It needs GSM8K solutions with <<expr=value>> calculator notes and a "
            f"final '#### N' line."
        )
    return examples, skipped


def load_humaneval(path: str | Path) -> list[Example]:
    """HumanEval (JSONL with `prompt`, `canonical_solution`) as "humaneval" examples: the prompt is the
    function signature and docstring, the response its canonical body; there is no single answer."""
    examples = [
        Example(
            _text_field(record, "prompt", where),
            _text_field(record, "canonical_solution", where),
            None,
            HUMANEVAL_TASK,
            where,
        )
        for record, where in read_records(path)
    ]
    if not examples:
        raise DataError(f"{path} holds no HumanEval problems; give the HumanEval.jsonl file.")
    return examples
