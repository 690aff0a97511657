"""The study's time budget: the work a config plans with its estimated duration, printed before the
first model loads, and the clock every stage reports its elapsed time to."""

from __future__ import annotations

import time

from lit_heads.analysis.study.config import StudyConfig


def plan_budget(cfg: StudyConfig, real: bool) -> dict[str, float]:
    """Planned work and the estimated seconds it takes, from the per-unit estimates of the config."""
    n_tasks = len(cfg.basic_tasks) + 1
    restricted_runs = 1 + int(cfg.restricted_random)
    n_track = cfg.sft_steps // cfg.track_every + 2
    steps = (n_tasks * cfg.sft_steps + restricted_runs * cfg.sft_steps
             + 3 * len(cfg.seeds) * (cfg.mix_steps + cfg.complex_steps))
    ap = (2 * n_tasks + restricted_runs) * cfg.ap_samples + n_track * cfg.track_samples
    gen = cfg.eval_samples * (2 + restricted_runs + 3 * len(cfg.seeds))
    # Real samples are ~2.5x longer than generated ones, and cost grows with length.
    length = 2.5 * cfg.real_max_length / 320
    real_steps = 3 * cfg.real_sft_steps * length if real else 0
    real_ap = 6 * cfg.real_ap_samples * length if real else 0
    seconds = ((steps + real_steps) * cfg.sec_per_step + (ap + real_ap) * cfg.sec_per_ap_sample
               + gen * cfg.sec_per_gen_sample)
    return {"sft_steps": steps, "real_sft_steps": cfg.real_sft_steps * 3 if real else 0, "ap_samples": ap,
            "real_ap_samples": 6 * cfg.real_ap_samples if real else 0, "generated_answers": gen,
            "eta_s": round(seconds)}


class Clock:
    """Elapsed time per stage, printed as the study goes (a 60-minute job must say where it is)."""

    def __init__(self, eta_s: float):
        self.start = time.perf_counter()
        self.eta_s = eta_s
        self.stages: dict[str, float] = {}
        self._last = self.start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._last, 1)
        self._last = now
        print(f"[study] {stage} done in {self.stages[stage]:.0f} s; "
              f"{now - self.start:.0f} s of ~{self.eta_s:.0f} s planned", flush=True)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)
