"""Attention heads: where they are (layout), how much each is used (scoring, AP of arXiv 2409.15820),
pattern statistics and the Pattern artifact. No Lightning imports here: the same code serves
callbacks, the CLI and notebooks."""

from lit_heads.heads.layout import HeadLayout, HeadsNotFound, LayerHeads, ParamSlice, find_heads
from lit_heads.heads.pattern import FORMULA_VERSION, Pattern, heatmap
from lit_heads.heads.scoring import HeadGateCapture, compute_ap, per_sample_loss, per_sample_scale

__all__ = [
    "FORMULA_VERSION",
    "HeadGateCapture",
    "HeadLayout",
    "HeadsNotFound",
    "LayerHeads",
    "ParamSlice",
    "Pattern",
    "compute_ap",
    "find_heads",
    "heatmap",
    "per_sample_loss",
    "per_sample_scale",
]
