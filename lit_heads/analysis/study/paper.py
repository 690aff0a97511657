"""The paper's numbers (arXiv 2409.15820, see DESIGN.md), quoted in results.json and the report next to ours."""

from __future__ import annotations

PAPER = {
    "r2": {"math-with-code ≈ math + code": 0.97, "instruction mix ≈ reasoning + programming": 0.95},
    "gini_llama3": {"before": 0.50, "after": 0.33},
    "application_math_benchmark": {
        "columns": ["Base", "SFT", "random mix first", "AP-guided mix first"],
        "Llama-7B": [28.68, 31.78, 33.82, 36.82],
        "Llama2-7B": [29.07, 34.50, 36.75, 38.50],
        "Llama3-8B": [46.12, 49.22, 50.10, 52.33],
    },
    "pattern_change": "patterns change most in the first ~200 steps",
}
