"""`lit_heads ap`: the activation pattern (Eq. 2) of a model on a data set, with heatmap and summary.

    lit_heads ap --model smollm2-135m --data ../shared/data/gsm8k/test.jsonl --n_samples 64 --output out/ap
    lit_heads ap --config ap.yaml --batch_size 4          # same YAML style as fit; flags override
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from lit_heads.atomic import atomic_write_text, writable_dir
from lit_heads.errors import ConfigError

PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}


def ap(
    model: str = "smollm2-135m",
    data: str = "generated:arithmetic,code,string,math_code",
    output: str = "out/ap",
    n_samples: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
    format: str = "auto",
    precision: str = "32-true",
    device: str = "auto",
    attn_implementation: str | None = None,
    seed: int = 42,
) -> dict:
    """Compute the L x H activation pattern of a model on a data set.

    Args:
        model: bundled short name, HF directory (e.g. a `lit_heads fit` export), .gguf file,
            Lightning checkpoint (.ckpt from `lit_heads fit`) or hub id.
        data: data file (.jsonl/.json/.parquet), hub id, or generated:<task>[,<task>...].
        output: folder for pattern.safetensors, pattern.npy, heatmap.png and summary.json.
        n_samples: number of samples scored (the first ones of the data set).
        batch_size: samples per forward/backward pass.
        max_length: tokens per sample (longer responses are truncated, and counted).
        format: record format of a data file (auto-detected by default).
        precision: 32-true, bf16-mixed, 16-mixed or bf16-true.
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        attn_implementation: sdpa, eager, ...; AP is the same with any of them.
        seed: seed for generated tasks.
    """
    from lit_heads.data import SFTDataModule, load_source
    from lit_heads.heads import stats
    from lit_heads.heads.pattern import heatmap
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.models import check_model, load_model, weights_dtype

    # Every check that can fail comes before the expensive work (de-quantizing, loading, scoring), and
    # the output folder is made only when there is something to write into it.
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not supported; use one of {sorted(PRECISIONS)}.")
    if n_samples < 1 or batch_size < 1:
        raise ConfigError(f"--n_samples and --batch_size must be >= 1, got {n_samples} and {batch_size}.")
    writable_dir(output, create=False)
    check_model(model, heads=True)
    examples = load_source(data, size=n_samples, seed=seed, format=format)[:n_samples]
    run_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                              else ("cpu" if device == "auto" else device))

    started = time.perf_counter()
    # bf16-true reads the weights in bfloat16 directly (weights_dtype also refuses a GPU without it).
    net = load_model(model, dtype=weights_dtype(None, precision, run_device), attn_implementation=attn_implementation)
    datamodule = SFTDataModule(tokenizer=model, batch_size=batch_size, max_length=max_length, format=format, seed=seed)
    loader = datamodule.make_dataloader(examples)
    autocast = PRECISIONS[precision] if precision.endswith("mixed") else None
    context = torch.autocast(run_device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        pattern = compute_ap(net, loader, device=run_device,
                             meta={"model": model, "data": data, "step": None, "precision": precision})
    seconds = time.perf_counter() - started

    out = writable_dir(output)
    pattern.save(out / "pattern.safetensors")
    pattern.to_npy(out / "pattern.npy")
    heatmap(pattern, out / "heatmap.png", title=f"activation pattern: {Path(model).name} on {Path(data).name}")
    top = stats.rank_heads(pattern.scores)[:10]
    summary = {
        **{k: v for k, v in pattern.meta.items()},
        "shape": list(pattern.shape),
        "statistics": stats.summary(pattern.scores),
        "top_heads": [list(h) for h in top],
        "seconds": round(seconds, 2),
        "files": {name: str(out / name) for name in ("pattern.safetensors", "pattern.npy", "heatmap.png",
                                                     "summary.json")},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    s = summary["statistics"]
    print(
        f"activation pattern of {model} on {data}: {pattern.shape[0]} layers x {pattern.shape[1]} heads, "
        f"{pattern.meta['n_samples']} samples, {seconds:.1f} s\n"
        f"  gini {s['gini']:.3f}  cv {s['cv']:.3f}  entropy {s['entropy']:.3f}\n"
        f"  top heads (layer, head): {', '.join(f'({l},{h})' for l, h in top)}\n"
        f"  wrote {out}/pattern.safetensors, pattern.npy, heatmap.png, summary.json"
    )
    return summary


def main(argv: list[str]) -> None:
    from jsonargparse import auto_cli

    auto_cli(ap, args=argv, as_positional=False, prog="lit_heads ap")
