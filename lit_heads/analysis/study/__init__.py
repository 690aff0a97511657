"""The paper's study end to end (Zhao et al., arXiv 2409.15820), on one model, in one process.

    Finding 1  SFT selectively activates task-specific heads (`findings.finding1`).
    Finding 2  ΔAP_complex ≈ Σ α_i ΔAP_basic_i (least squares and NNLS), R², residual; control: the same
               fit with a basic task that is *not* part of the composite swapped in; noise ceiling from two
               disjoint halves of the probe (`measures.composition`); once per probe mode (`tasks.probe`:
               own task's samples, the complex task's, a fixed mix of all tasks').
    Finding 3  pattern change over the steps of the complex task's SFT, and SFT of only the top-k heads
               against full SFT with a random-k control (`findings`).
    Causal check  mask the top-k, random-k and bottom-k heads by the complex task's AP and by its |ΔAP| on
               its fine-tuned model and measure the held-out loss increase (`causal`, `lit_heads ablate`'s logic).
    Application  α → a mix of basic-task data, then the scarce complex data, against complex-only SFT, a
               random mix and a data-size-weighted mix at the same step budget, over seeds, with t-intervals
               and paired differences (`application`).

Several models run one after the other (`model` as a list), each into its own folder, with a side-by-side
report (`report.write_side_by_side`, also for earlier runs via `combine`).

Everything reuses the library: `SFTModule` (loss, generation), `SFTDataModule` (encoding), `compute_ap`,
`stats`, `fit_composition`, `build_mix`, `HeadRestriction`.

The modules, in the order the data flows (each imports only those above it):

    paper        the paper's numbers
    config       StudyConfig and its validation (device included), before any model loads
    tasks        generated and real tasks (train / held-out) and the probe rule for patterns
    runner       StudyRunner: one loaded model, reset / train / patterns / accuracy on the configured device
    tracker      PatternTracker, the callback that records the pattern during training
    measures     numbers from patterns alone: similarity, composition, change over steps, spread
    findings     the stages of Findings 1 and 3
    application  the data-mixing stage and its arms
    causal       the causal check of the AP and |ΔAP| rankings (`lit_heads.analysis.ablation`)
    budget       planned work per stage, ETA, and the per-stage clock that re-estimates the time left
    figures      the report's matplotlib figures
    report       report.md
    run          run_study: every stage in order, results.json after each
"""

from lit_heads.analysis.study.application import ARM_LABELS, ARMS, MIX_ARMS, application, mix_weights
from lit_heads.analysis.study.budget import Clock, plan_budget
from lit_heads.analysis.study.causal import RANKINGS, causal_check, rankings
from lit_heads.analysis.study.config import PROBES, StudyConfig, resolve_device
from lit_heads.analysis.study.findings import finding1, finding3_restricted
from lit_heads.analysis.study.measures import (
    change_over_steps,
    composition,
    cross_half_r2,
    paired,
    similarity,
    specificity,
    summary,
)
from lit_heads.analysis.study.paper import PAPER
from lit_heads.analysis.study.report import write_report, write_side_by_side
from lit_heads.analysis.study.run import run_study
from lit_heads.analysis.study.runner import StudyRunner, trainer_device
from lit_heads.analysis.study.tasks import Task, generated_tasks, probe, real_tasks
from lit_heads.analysis.study.tracker import PatternTracker

__all__ = [
    "ARMS", "ARM_LABELS", "MIX_ARMS", "PAPER", "PROBES", "RANKINGS", "Clock", "PatternTracker", "StudyConfig",
    "StudyRunner", "Task", "application", "causal_check", "rankings", "change_over_steps", "composition",
    "cross_half_r2", "finding1", "finding3_restricted",
    "generated_tasks", "mix_weights", "paired", "plan_budget", "probe", "real_tasks", "resolve_device", "run_study",
    "similarity", "specificity", "summary", "trainer_device", "write_report", "write_side_by_side",
]
