"""The activation-pattern artifact: an L x H float32 score matrix plus provenance metadata.

Saved as safetensors (one tensor, "scores") with the metadata JSON-encoded under the safetensors
metadata key "lit_heads", so a pattern file is self-describing and loads without pickle. Plain
`.npy` import/export matches the authors' release, which ships bare L x H arrays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_heads.atomic import atomic_write  # re-exported: callers import it from here too
from lit_heads.errors import ConfigError, DataError

__all__ = ["FORMULA_VERSION", "Pattern", "atomic_write", "heatmap"]

# Bump when the scoring definition changes (loss normalisation, |.| placement...), so patterns
# computed under different definitions are never compared silently.
FORMULA_VERSION = "ap-eq2-v1"
_META_KEY = "lit_heads"
_TENSOR_KEY = "scores"


@dataclass
class Pattern:
    """Per-head activation scores `scores[layer, head]` (float32) with metadata.

    Standard meta fields: model, data, step, n_samples, formula_version; anything JSON-serialisable
    may be added.
    """

    scores: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        s = self.scores
        if isinstance(s, np.ndarray):
            s = torch.from_numpy(np.ascontiguousarray(s))
        if not isinstance(s, torch.Tensor) or s.dim() != 2:
            shape = tuple(getattr(s, "shape", ()))
            raise ConfigError(
                f"A Pattern needs a 2-D [layers, heads] score matrix; got shape {shape}. Reshape it to "
                f"(n_layers, n_heads) first."
            )
        self.scores = s.detach().to(device="cpu", dtype=torch.float32).contiguous()
        meta = {"model": None, "data": None, "step": None, "n_samples": None, "formula_version": FORMULA_VERSION}
        meta.update(self.meta or {})
        self.meta = meta

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def numpy(self) -> np.ndarray:
        return self.scores.numpy().copy()

    def check_shape(self, n_layers: int, n_heads: int) -> "Pattern":
        if self.shape != (n_layers, n_heads):
            raise ConfigError(
                f"Activation pattern has shape {self.n_layers} layers x {self.n_heads} heads "
                f"(model={self.meta.get('model')!r}) but this model has {n_layers} layers x {n_heads} heads; "
                f"the pattern was computed on another model. Recompute it on this model (compute_ap) or "
                f"load the pattern that belongs to it."
            )
        return self

    # -- safetensors ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save as st_save

        path = Path(path)
        try:
            meta_json = json.dumps(self.meta, sort_keys=True)
        except TypeError as e:
            raise ConfigError(
                f"Pattern metadata must be JSON-serialisable to save {path}: {e}. Convert the offending "
                f"value (e.g. a tensor or Path) to a number or string."
            ) from None
        blob = st_save({_TENSOR_KEY: self.scores}, metadata={_META_KEY: meta_json})
        atomic_write(path, lambda f: f.write(blob))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pattern":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"Activation pattern file {path} does not exist; pass the path written by Pattern.save.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_raw = (f.metadata() or {}).get(_META_KEY)
                if _TENSOR_KEY not in f.keys():
                    raise DataError(
                        f"{path} is a safetensors file without a {_TENSOR_KEY!r} tensor, so it is not a lit_heads "
                        f"pattern; for a bare L x H array use Pattern.from_npy."
                    )
                scores = f.get_tensor(_TENSOR_KEY)
        except SafetensorError as e:
            raise DataError(
                f"{path} is not a readable safetensors pattern ({e}); for a .npy array use Pattern.from_npy."
            ) from None
        meta = json.loads(meta_raw) if meta_raw else {}
        return cls(scores, meta)

    # -- npy --------------------------------------------------------------------------------------
    def to_npy(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        arr = self.numpy()
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
        return path

    @classmethod
    def from_npy(cls, path: str | os.PathLike, **meta) -> "Pattern":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Activation pattern file {path} does not exist.")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/UnpicklingError variants
            raise DataError(f"{path} is not a plain .npy array ({e}); expected an L x H float array.") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(
                f"{path} holds a {arr.dtype} array of shape {arr.shape}; an activation pattern is a 2-D numeric "
                f"[layers, heads] array."
            )
        meta.setdefault("source", str(path))
        return cls(torch.from_numpy(arr.astype(np.float32)), meta)

    def __repr__(self) -> str:
        keys = {k: self.meta.get(k) for k in ("model", "data", "step", "n_samples")}
        return f"Pattern(shape={self.shape}, {keys})"


def heatmap(pattern: Pattern | torch.Tensor | np.ndarray, path: str | os.PathLike, *, title: str | None = None,
            cmap: str = "viridis", dpi: int = 120) -> Path:
    """Save a layer x head heatmap (PNG by the path's suffix) atomically; returns the path."""
    # Figure() without pyplot needs no backend switch (savefig picks Agg for png), so the caller's
    # matplotlib backend and global state are left alone.
    from matplotlib.figure import Figure

    p = pattern if isinstance(pattern, Pattern) else Pattern(pattern)
    data = p.numpy()
    path = Path(path)
    n_layers, n_heads = data.shape
    fig = Figure(figsize=(max(4.0, 0.35 * n_heads + 2.5), max(3.0, 0.22 * n_layers + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    if title is None:
        title = " · ".join(str(p.meta[k]) for k in ("model", "data", "step") if p.meta.get(k) is not None) or None
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="activation score")
    fig.tight_layout()
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    return path
