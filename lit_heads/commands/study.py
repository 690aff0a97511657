"""`lit_heads study`: the paper's whole study on one model, with a report.

    lit_heads study --config configs/study.yaml               # default profile, <= 60 min on 2 CPU cores
    lit_heads study --config configs/study_quick.yaml         # CI profile, a few minutes
    lit_heads study --config configs/study.yaml --seeds '[0,1,2,3]' --output runs/study4
    lit_heads study --config configs/study.yaml --device cuda  # on the first GPU (default: cpu)

Writes report.md, results.json, figures/, patterns/ and mix/ under --output. Every option is a field
of `lit_heads.analysis.study.StudyConfig` (analysis/study/config.py); `--print_config` shows them all.
"""

from __future__ import annotations

from dataclasses import fields

DESCRIPTION = (
    "Reproduce arXiv 2409.15820 end to end: task-specific heads, composition of patterns, pattern change "
    "over steps and head-restricted SFT, AP-guided data mixing; writes report.md, results.json and figures."
)


def main(argv: list[str]) -> dict:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_heads.analysis.study import StudyConfig, run_study

    parser = ArgumentParser(prog="lit_heads study", description=DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with StudyConfig fields (configs/study.yaml).")
    parser.add_class_arguments(StudyConfig, as_group=False)
    parsed = parser.parse_args(argv)
    config = StudyConfig(**{f.name: parsed[f.name] for f in fields(StudyConfig)})
    return run_study(config)
