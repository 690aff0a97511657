"""`lit_heads study`: the paper's whole study on one model or several, with a report.

    lit_heads study --config configs/study.yaml               # default profile (see configs/study.yaml)
    lit_heads study --config configs/study_quick.yaml         # CI profile, a few minutes
    lit_heads study --config configs/study.yaml --seeds '[0,1,2,3,4,5,6]' --output runs/study7
    lit_heads study --config configs/study.yaml --model '[smollm2-135m, gemma3-270m]'   # side by side
    lit_heads study --combine '[runs/a, runs/b]' --output runs/both                    # earlier runs side by side
    lit_heads study --config configs/study.yaml --probes '[own]'   # Finding 2 on each task's own samples only
    lit_heads study --config configs/study.yaml --device cuda  # on the first GPU (default: cpu)
    lit_heads study --config configs/study.yaml --ablate_k '[1, 9]' --ablate_mask zero   # causal check's schedule

Writes report.md, results.json, figures/, patterns/ and mix/ under --output (one folder per model when
several run, with a side-by-side report.md above them). Every option is a field of
`lit_heads.analysis.study.StudyConfig` (analysis/study/config.py); `--print_config` shows them all.
"""

from __future__ import annotations

from dataclasses import fields

DESCRIPTION = (
    "Reproduce arXiv 2409.15820 end to end: task-specific heads, composition of patterns on three probe sets "
    "with controls and a noise ceiling, a causal check of the AP and |ΔAP| head rankings (masking top-k vs "
    "random-k vs bottom-k heads), pattern change over steps and head-restricted SFT, AP-guided data mixing "
    "against random and size-weighted mixes over seeds; one model or several side by side; writes report.md, "
    "results.json and figures."
)


def main(argv: list[str]) -> dict:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_heads.analysis.study import StudyConfig, run_study

    parser = ArgumentParser(prog="lit_heads study", description=DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file with StudyConfig fields (configs/study.yaml).")
    parser.add_class_arguments(StudyConfig, as_group=False)
    parsed = parser.parse_args(argv)
    config = StudyConfig(**{f.name: parsed[f.name] for f in fields(StudyConfig)})
    return run_study(config)
