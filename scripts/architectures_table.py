"""Run the architecture sweep over every causal-LM model type of the installed transformers and write
its table into README.md (between the `architectures:begin` / `architectures:end` markers).

    python scripts/architectures_table.py          # run the sweep, rewrite the README block
    python scripts/architectures_table.py --check  # exit 1 if the README block differs

tests/test_architectures.py runs the same sweep and fails when the README block is out of date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import arch_sweep  # noqa: E402  (tests/ is put on the path just above)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; do not write README.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outcomes = {}
    for mt in arch_sweep.MODEL_TYPES:
        outcomes[mt] = arch_sweep.check(mt)
        print(f"{outcomes[mt].status:6s} {mt:28s} {outcomes[mt].seconds:5.1f}s", file=sys.stderr, flush=True)
    table = arch_sweep.render_table(outcomes)
    print(table)
    print(f"sweep took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    text = args.readme.read_text(encoding="utf-8")
    if args.check:
        if arch_sweep.readme_block(text) != table:
            print(f"{args.readme} is out of date: run python scripts/architectures_table.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(arch_sweep.with_block(text, table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
