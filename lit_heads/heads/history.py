"""A run's sequence of activation patterns, its change statistics, and its one-file storage.

Used by the HeadActivationMonitor callback, but plain torch: notebooks and reports read the same
file with `PatternHistory.load`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lit_heads.heads import stats
from lit_heads.heads.pattern import FORMULA_VERSION, atomic_write

_META_KEY = "lit_heads"


class PatternHistory:
    """Patterns by optimizer step. `append` returns the statistics logged for that step:
    gini, cv, entropy; mse/corr against the first (step-0) pattern and the previous one; and the
    top-k Jaccard overlap of this ranking with the previous one."""

    def __init__(self):
        self.steps: list[int] = []
        self.scores: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, step: int, scores: torch.Tensor, top_k: int = 10) -> dict[str, float]:
        scores = scores.detach().float().cpu()
        self.steps.append(int(step))
        self.scores.append(scores)
        return self.statistics(len(self) - 1, top_k)

    def statistics(self, i: int, top_k: int = 10) -> dict[str, float]:
        current, first = self.scores[i], self.scores[0]
        previous = self.scores[i - 1] if i > 0 else current
        top_k = min(top_k, current.numel())  # small models have fewer heads than the default k
        return {
            **stats.summary(current),
            "mse_vs_start": stats.mse(current, first),
            "corr_vs_start": stats.pearson(current, first),
            "mse_vs_prev": stats.mse(current, previous),
            "corr_vs_prev": stats.pearson(current, previous),
            "topk_overlap_prev": stats.topk_jaccard(current, previous, top_k),
        }

    @staticmethod
    def long_rows(step: int, scores: torch.Tensor) -> list[list]:
        """(step, layer, head, score, rank) rows; rank 1 is the most active head."""
        ranking = stats.rank_heads(scores)
        rank = {head: r + 1 for r, head in enumerate(ranking)}
        n_layers, n_heads = scores.shape
        return [[step, l, h, float(scores[l, h]), rank[(l, h)]] for l in range(n_layers) for h in range(n_heads)]

    # ---- storage ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "scores": [s.clone() for s in self.scores]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.scores = [torch.as_tensor(s).float() for s in state["scores"]]

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        tensors = {"steps": torch.tensor(self.steps, dtype=torch.int64),
                   "scores": torch.stack(self.scores).contiguous()}
        info = {"formula_version": FORMULA_VERSION, **(meta or {})}
        data = save(tensors, metadata={_META_KEY: json.dumps(info)})
        path = Path(path)
        atomic_write(path, lambda f: f.write(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PatternHistory":
        tensors = load_file(str(path))
        history = cls()
        history.load_state_dict({"steps": tensors["steps"].tolist(), "scores": list(tensors["scores"])})
        return history

    # ---- plots --------------------------------------------------------------------------------
    def plot_statistics(self, path: str | Path, top_k: int = 10) -> Path:
        """Statistics over steps, one panel each, saved atomically as PNG."""
        from matplotlib.figure import Figure

        top_k = min(top_k, self.scores[0].numel())
        rows = [self.statistics(i, top_k) for i in range(len(self))]
        keys = ["gini", "cv", "entropy", "corr_vs_start", "mse_vs_start", "topk_overlap_prev"]
        fig = Figure(figsize=(11, 6))
        for n, key in enumerate(keys):
            ax = fig.add_subplot(2, 3, n + 1)
            ax.plot(self.steps, [r[key] for r in rows], marker="o")
            ax.set_title(key if key != "topk_overlap_prev" else f"top-{top_k} overlap with previous")
            ax.set_xlabel("step")
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        return path
