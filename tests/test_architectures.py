"""The architecture sweep: every causal-LM model type of the installed transformers, tiny and random,
through head discovery, AP against the Γ reference and head-restricted AdamW (tests/arch_sweep.py).
Marked slow: `pytest -m "not slow"` skips it."""

from __future__ import annotations

from pathlib import Path

import pytest

import arch_sweep

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
RESULTS: dict[str, arch_sweep.Outcome] = {}


def test_lists_are_about_known_model_types():
    for name in (arch_sweep.NOT_APPLICABLE, arch_sweep.XFAIL, arch_sweep.CONFIG_FIXES):
        assert set(name) <= set(arch_sweep.MODEL_TYPES), set(name) - set(arch_sweep.MODEL_TYPES)
    assert not set(arch_sweep.NOT_APPLICABLE) & set(arch_sweep.XFAIL)


@pytest.mark.parametrize("model_type", arch_sweep.MODEL_TYPES)
def test_model_type(model_type):
    out = RESULTS[model_type] = arch_sweep.check(model_type)
    if model_type in arch_sweep.XFAIL:
        assert out.status == "xfail", out.detail  # an XPASS fails: take it off the list
        pytest.xfail(arch_sweep.XFAIL[model_type])
    if model_type in arch_sweep.NOT_APPLICABLE:
        kind, _ = arch_sweep.NOT_APPLICABLE[model_type]
        assert out.status == "n/a" and out.detail.startswith(f"{kind}:"), out.detail
        return
    assert out.status == "exact", out.detail


def test_readme_table_is_up_to_date(capsys):
    if set(RESULTS) != set(arch_sweep.MODEL_TYPES):
        pytest.skip("the README table needs the whole sweep in this session")
    table = arch_sweep.render_table(RESULTS)
    seconds = sum(o.seconds for o in RESULTS.values())
    with capsys.disabled():
        print(f"\n{table}\n(sweep: {seconds:.0f} s)")
    assert arch_sweep.readme_block(README.read_text(encoding="utf-8")) == table, (
        "README.md's architecture table is out of date: run python scripts/architectures_table.py")
