"""The study's time budget: the work a config plans, stage by stage, with its estimated duration, printed
before the first model loads, and the clock every stage reports its elapsed time to, which re-estimates
the time left from the pace measured so far."""

from __future__ import annotations

import time

from lit_heads.analysis.study.application import ARMS
from lit_heads.analysis.study.causal import n_evaluations
from lit_heads.analysis.study.config import StudyConfig

# Stage keys in the order the study runs them, with the names printed and written to results.json.
STAGES = {
    "base": "base accuracy",
    "finding1": "finding 1 (patterns before/after SFT, every probe)",
    "finding2": "finding 2 (composition, every probe)",
    "ablation": "causal check (masking heads ranked by AP and |ΔAP|)",
    "finding3": "finding 3 (change over steps, head-restricted SFT)",
    "application": "application (mixes over seeds)",
    "real": "real tasks (findings 1-2)",
}


def distinct_probes(cfg: StudyConfig) -> tuple[int, int]:
    """Probe sets scored on the base model and, summed over the tasks, on the fine-tuned models: each
    mode's samples once per model state (the shared modes are one set; 'complex' is the complex task's
    own set)."""
    names = [*cfg.basic_tasks, cfg.complex_task]
    own, shared = "own" in cfg.probes, [p for p in cfg.probes if p != "own"]
    before = (len(names) if own else 0) + sum(1 for p in shared if not (p == "complex" and own))
    after = sum((1 if own else 0) + sum(1 for p in shared if not (p == "complex" and own and t == cfg.complex_task))
                for t in names)
    return before, after


def plan_budget(cfg: StudyConfig, real: bool, scale: float = 1.0) -> dict:
    """Planned work per stage (SFT steps, pattern samples, graded answers, forward-only loss samples) and the
    estimated seconds, from the per-unit estimates of the config (measured for SmolLM2-135M) times `scale`, the
    model's compute per token relative to SmolLM2's (`config.REFERENCE_MATMUL_WEIGHTS`). Generation gains less
    from a smaller model than training does, so for a larger model the scaled generation time is an upper bound."""
    n_tasks = len(cfg.basic_tasks) + 1
    restricted_runs = 1 + int(cfg.restricted_random)
    n_track = cfg.sft_steps // cfg.track_every + 2
    trained_arms = len(ARMS) - 1
    before, after = distinct_probes(cfg)
    # Real samples are ~2.5x longer than generated ones at real_max_length 320, and cost grows with length.
    length = 2.5 * cfg.real_max_length / 320
    work = {
        "base": {"gen": cfg.eval_samples},
        "finding1": {"steps": n_tasks * cfg.sft_steps,
                     "ap": (before + after) * cfg.ap_samples + n_track * cfg.track_samples,
                     "gen": cfg.eval_samples},
        "finding2": {},
        # One loss per evaluation over the causal samples, plus the forward pass of the mean ablation's means.
        "ablation": {"loss": (n_evaluations(cfg.ablate_k, cfg.ablate_seeds) + (cfg.ablate_mask == "mean"))
                     * cfg.ablate_samples},
        "finding3": {"steps": restricted_runs * cfg.sft_steps, "ap": restricted_runs * cfg.ap_samples,
                     "gen": restricted_runs * cfg.eval_samples},
        "application": {"steps": len(cfg.seeds) * trained_arms * (cfg.mix_steps + cfg.complex_steps),
                        "gen": len(cfg.seeds) * trained_arms * cfg.eval_samples},
    }
    if real:
        work["real"] = {"steps": 3 * cfg.real_sft_steps * length, "ap": 6 * cfg.real_ap_samples * length}
    rate = {"steps": cfg.sec_per_step * scale, "ap": cfg.sec_per_ap_sample * scale,
            "gen": cfg.sec_per_gen_sample * scale, "loss": cfg.sec_per_loss_sample * scale}
    stages = {k: round(sum(v * rate[u] for u, v in w.items())) for k, w in work.items()}

    def total(unit: str, only: tuple[str, ...] | None = None) -> int:
        return round(sum(w.get(unit, 0) for k, w in work.items() if only is None or k in only))

    generated = tuple(k for k in work if k != "real")
    return {"sft_steps": total("steps", generated), "real_sft_steps": cfg.real_sft_steps * 3 if real else 0,
            "ap_samples": total("ap", generated), "real_ap_samples": 6 * cfg.real_ap_samples if real else 0,
            "generated_answers": total("gen"), "loss_samples": total("loss"), "scale": scale, "stages": stages,
            "eta_s": sum(stages.values())}


def describe_plan(cfg: StudyConfig, budget: dict, model: str) -> str:
    """The plan as printed before the model loads."""
    per_stage = ", ".join(f"{k} ~{v / 60:.1f}" for k, v in budget["stages"].items() if v)
    return (f"[study] plan for {model}: {budget['sft_steps']} SFT steps, {budget['ap_samples']} pattern samples "
            f"({len(cfg.probes)} probe mode(s): {', '.join(cfg.probes)}), {budget['generated_answers']} graded answers "
            f"({len(cfg.seeds)} seeds × {len(ARMS) - 1} trained arms), {budget['loss_samples']} sample losses "
            f"(causal check, k = {sorted(set(cfg.ablate_k))})"
            + (f", real tasks {budget['real_sft_steps']} steps" if budget["real_sft_steps"] else "")
            + f"; estimated {budget['eta_s'] / 60:.1f} min at {cfg.sec_per_step} s/step, {cfg.sec_per_ap_sample} "
            f"s/pattern sample, {cfg.sec_per_gen_sample} s/answer, {cfg.sec_per_loss_sample} s/sample loss"
            + (f" (SmolLM2-135M's) x {budget['scale']:.2f} for this model's compute per token"
               if budget.get("scale", 1.0) != 1.0 else "")
            + f" (minutes per stage: {per_stage})")


class Clock:
    """Elapsed time per stage, printed as the study goes (a 60-minute job must say where it is), with the
    time left re-estimated from the pace so far: the remaining stages' planned seconds times the ratio
    of the elapsed to the planned seconds of the stages done."""

    def __init__(self, eta_s: float, planned: dict[str, float] | None = None):
        self.start = time.perf_counter()
        self.eta_s = eta_s
        self.planned = dict(planned or {})
        self.stages: dict[str, float] = {}
        self._last = self.start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._last, 1)
        self._last = now
        message = (f"[study] {STAGES.get(stage, stage)} done in {self.stages[stage]:.0f} s; "
                   f"{now - self.start:.0f} s of ~{self.eta_s:.0f} s planned")
        left = self.left_s()
        if left is not None:
            message += f"; at this pace ~{left / 60:.1f} min left"
        print(message, flush=True)

    def left_s(self) -> float | None:
        """Seconds the stages not yet done should take at the pace measured so far; None until the stages
        done were planned to take 10% of the whole (a few graded answers say little about training speed)."""
        planned_done = sum(self.planned.get(s, 0) for s in self.stages)
        if planned_done <= 0 or planned_done < 0.1 * sum(self.planned.values()):
            return None
        pace = sum(self.stages[s] for s in self.stages if s in self.planned) / planned_done
        return pace * sum(v for s, v in self.planned.items() if s not in self.stages)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)
