"""Choosing which attention heads to train.

A head is a ``(layer, head)`` pair of query-head indices, both 0-based. Every function here returns
heads as a sorted list of plain ``int`` tuples, so a selection prints, compares and serialises the
same way wherever it came from (AP scores, a seed, or a LoFiT-style file).

Strategies of :func:`select_heads`:

- ``top``: the heads with the highest activation-pattern (AP) scores (the heads SFT recruits).
- ``bottom``: the lowest-scoring heads (a control: heads the task does not use).
- ``random``: a seeded uniform sample (the random-head control LoFiT reports against). It uses its
  own ``torch.Generator``, so the same seed gives the same heads whatever else consumed the global
  RNG before.
- ``list``: an explicit list, e.g. from :func:`load_head_list`.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch

from lit_heads.errors import ConfigError

STRATEGIES = ("top", "bottom", "random", "list")

Head = tuple[int, int]


def select_heads(
    strategy: str,
    n_layers: int,
    n_heads: int,
    *,
    top_k: int | None = None,
    fraction: float | None = None,
    scores: torch.Tensor | None = None,
    heads: list[tuple[int, int]] | None = None,
    seed: int = 0,
) -> list[Head]:
    """Return the selected heads as a sorted list of ``(layer, head)``.

    ``top``, ``bottom`` and ``random`` take exactly one of ``top_k`` (a count) or ``fraction`` (of
    all ``n_layers * n_heads`` heads; the count is ``max(1, round(fraction * n_layers * n_heads))``).
    ``top`` and ``bottom`` need ``scores`` of shape ``[n_layers, n_heads]``; ties are broken by
    head order (lower layer, then lower head first), so the result is deterministic.
    ``list`` takes ``heads`` and nothing else; duplicates are dropped.
    """
    _check_dims(n_layers, n_heads)
    top_k, fraction = check_selection_options(
        strategy, top_k=top_k, fraction=fraction, has_heads=heads is not None, n_layers=n_layers, n_heads=n_heads
    )
    if strategy == "list":
        heads = _normalise(heads, n_layers, n_heads)
        if not heads:
            raise ConfigError(
                "The head list is empty, so no attention head would be trained. Give at least one "
                "(layer, head) pair."
            )
        return heads
    k = _count(n_layers, n_heads, top_k, fraction)

    if strategy == "random":
        generator = torch.Generator().manual_seed(int(seed))
        flat = torch.randperm(n_layers * n_heads, generator=generator)[:k]
    else:
        scores = _check_scores(scores, strategy, n_layers, n_heads)
        # Stable sort keeps tied heads in head order, so equal scores never reorder between runs.
        order = torch.sort(scores.flatten(), descending=(strategy == "top"), stable=True).indices
        flat = order[:k]
    return sorted((int(i) // n_heads, int(i) % n_heads) for i in flat)


def check_selection_options(
    strategy: str,
    *,
    top_k: int | None = None,
    fraction: float | None = None,
    has_heads: bool = False,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> tuple[int | None, float | None]:
    """Check the head-selection options before anything is scored, and return ``(top_k, fraction)``.

    The one check shared by :func:`select_heads` and the ``HeadRestrictedFinetuning`` callback (which
    calls it first without a model, then with the model's ``n_layers`` and ``n_heads`` before it
    scores any sample). Without the model's size only the lower bound of ``top_k`` is checked.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"Unknown head-selection strategy {strategy!r}. Use one of: {', '.join(STRATEGIES)} "
            "('top'/'bottom' rank heads by activation-pattern scores, 'random' samples with a seed, "
            "'list' takes an explicit head list)."
        )
    if strategy == "list":
        if top_k is not None or fraction is not None:
            raise ConfigError(
                "Conflicting head-selection options: strategy 'list' trains exactly the heads of its head "
                f"list, but top_k={top_k!r} / fraction={fraction!r} was also set. Remove top_k and "
                "fraction, or use strategy 'top', 'bottom' or 'random' to choose a number of heads."
            )
        if not has_heads:
            raise ConfigError(
                "Head-selection strategy 'list' needs a head list (`heads`): a file (.npy [K, 2] as LoFiT "
                "saves it, .json, .txt or .csv of layer,head pairs), or in Python heads=[(layer, head), ...] "
                "or load_head_list(path)."
            )
        return None, None
    if has_heads:
        raise ConfigError(
            f"Conflicting head-selection options: strategy {strategy!r} chooses heads itself, but an "
            "explicit head list was also given. Use strategy 'list' to train exactly those heads, or "
            "drop the head list."
        )
    if (top_k is None) == (fraction is None):
        raise ConfigError(
            "Set exactly one of top_k (a number of heads) or fraction (a share of all heads) to say "
            f"how many heads to select; got top_k={top_k!r} and fraction={fraction!r}."
        )
    if n_layers is not None and n_heads is not None:
        _count(n_layers, n_heads, top_k, fraction)
    elif top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} is out of range: it is a number of heads, an integer >= 1.")
    elif fraction is not None:
        _check_fraction(fraction)
    return top_k, fraction


def heads_to_mask(heads: list[tuple[int, int]], n_layers: int, n_heads: int) -> torch.Tensor:
    """Boolean ``[n_layers, n_heads]`` mask that is True at the given heads."""
    _check_dims(n_layers, n_heads)
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in _normalise(heads, n_layers, n_heads):
        mask[layer, head] = True
    return mask


def mask_to_heads(mask: torch.Tensor) -> list[Head]:
    """Sorted ``(layer, head)`` list of the True entries of a ``[n_layers, n_heads]`` mask."""
    if mask.dim() != 2:
        raise ConfigError(
            f"A head mask must have shape [n_layers, n_heads], but this one has shape "
            f"{list(mask.shape)}."
        )
    return [(int(l), int(h)) for l, h in torch.nonzero(mask.bool()).tolist()]


def load_head_list(path: str | Path) -> list[Head]:
    """Read a head list from ``.npy``, ``.json``, ``.txt`` or ``.csv``.

    - ``.npy``: an integer array of shape ``[K, 2]`` of ``(layer, head)`` rows (as LoFiT saves them).
    - ``.json``: ``[[layer, head], ...]``, or ``{"heads": [[layer, head], ...]}``.
    - ``.txt`` / ``.csv``: one ``layer,head`` per line (a comma or whitespace between them); blank
      lines, ``#`` comments and a non-numeric header line are skipped.

    Heads are returned in file order, unvalidated against a model; :func:`select_heads` with
    strategy ``list`` checks them against the model's size, sorts and de-duplicates them.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Head list file {path} does not exist. Check the path.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".json":
        return _load_json(path)
    if suffix in (".txt", ".csv"):
        return _load_text(path)
    raise ConfigError(
        f"Head list file {path} has an unsupported extension {path.suffix!r}. Use .npy (an array of "
        "shape [K, 2]), .json ([[layer, head], ...]) or .txt/.csv (one 'layer,head' per line)."
    )


def save_head_list(path: str | Path, heads: list[tuple[int, int]]) -> Path:
    """Write heads in the format :func:`load_head_list` reads, chosen by the file extension."""
    path = Path(path)
    rows = [[int(l), int(h)] for l, h in heads]
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        np.save(path, np.asarray(rows, dtype=np.int64).reshape(-1, 2))
    elif suffix == ".json":
        path.write_text(json.dumps(rows) + "\n")
    elif suffix in (".txt", ".csv"):
        path.write_text("layer,head\n" + "".join(f"{l},{h}\n" for l, h in rows))
    else:
        raise ConfigError(
            f"Cannot save a head list to {path}: use a .npy, .json, .txt or .csv file name."
        )
    return path


# --------------------------------------------------------------------------------------------------


def _check_dims(n_layers: int, n_heads: int) -> None:
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _is_int(value) -> bool:
    # bool is an int subclass; True as a head count is almost certainly a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _count(n_layers: int, n_heads: int, top_k, fraction) -> int:
    total = n_layers * n_heads
    if top_k is not None:
        if not _is_int(top_k) or not 1 <= top_k <= total:
            raise ConfigError(
                f"top_k={top_k!r} is out of range: the model has {n_layers} layers x {n_heads} heads "
                f"= {total} heads, so top_k must be an integer from 1 to {total}."
            )
        return int(top_k)
    _check_fraction(fraction)
    return max(1, round(fraction * total))


def _check_fraction(fraction) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
        math.isfinite(fraction) and 0 < fraction <= 1
    ):
        raise ConfigError(
            f"fraction={fraction!r} is out of range: it is the share of all heads to select and must "
            "be greater than 0 and at most 1 (e.g. 0.05 for 5% of the heads)."
        )


def _check_scores(scores, strategy: str, n_layers: int, n_heads: int) -> torch.Tensor:
    if scores is None:
        raise ConfigError(
            f"Head-selection strategy {strategy!r} ranks heads by activation-pattern scores, but no "
            "scores were given. Compute them first (the AP scorer in lit_heads.heads) and pass "
            "scores=..., or use strategy 'random' or 'list'."
        )
    scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (n_layers, n_heads):
        raise ConfigError(
            f"Head scores have shape {list(scores.shape)}, but the model needs [n_layers, n_heads] = "
            f"[{n_layers}, {n_heads}]. Check that the scores were computed on this model."
        )
    scores = scores.detach().to("cpu", torch.float64)
    if not torch.isfinite(scores).all():
        raise ConfigError(
            f"Head scores contain NaN or infinite values, so strategy {strategy!r} cannot rank "
            "heads. Recompute the scores (a NaN usually means the loss was NaN or had no response "
            "tokens)."
        )
    return scores


def _normalise(heads, n_layers: int, n_heads: int) -> list[Head]:
    out = set()
    for entry in heads:
        pair = tuple(entry.tolist()) if isinstance(entry, torch.Tensor) else tuple(entry)
        if len(pair) != 2 or not all(_is_int(x) for x in pair):
            raise ConfigError(
                f"Head {entry!r} is not a (layer, head) pair of integers. Write heads as "
                "[[layer, head], ...]."
            )
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ConfigError(
                f"Head (layer={layer}, head={head}) is out of range: the model has {n_layers} "
                f"layers and {n_heads} query heads per layer, so layers run 0..{n_layers - 1} and "
                f"heads 0..{n_heads - 1}. Was the head list made for another model?"
            )
        out.add((layer, head))
    return sorted(out)


def _load_npy(path: Path) -> list[Head]:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for corrupt or pickled files
        raise ConfigError(f"Could not read head list {path} as a .npy array: {exc}") from exc
    if array.ndim != 2 or array.shape[1] != 2 or array.dtype.kind not in "iuf":
        raise ConfigError(
            f"Head list {path} holds an array of shape {list(array.shape)} and dtype {array.dtype}; "
            "it must be a numeric array of shape [K, 2] with one (layer, head) row per head."
        )
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise ConfigError(f"Head list {path} has non-integer entries; layers and heads are integers.")
    return [(int(l), int(h)) for l, h in array.astype(np.int64).tolist()]


def _load_json(path: Path) -> list[Head]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Head list {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "heads" in data:
        data = data["heads"]
    ok = isinstance(data, list) and all(
        isinstance(row, list) and len(row) == 2 and all(_is_int(x) for x in row) for row in data
    )
    if not ok:
        raise ConfigError(
            f"Head list {path} must hold a JSON list of [layer, head] integer pairs, e.g. "
            "[[0, 3], [5, 1]] (or {\"heads\": [...]})."
        )
    return [(int(l), int(h)) for l, h in data]


def _load_text(path: Path) -> list[Head]:
    heads = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.replace(",", " ").split()
        try:
            if len(fields) != 2:
                raise ValueError
            heads.append((int(fields[0]), int(fields[1])))
        except ValueError:
            if not heads and not any(c.isdigit() for c in line):
                continue  # a header line such as "layer,head"
            raise ConfigError(
                f"{path}:{lineno}: expected 'layer,head' (two integers), got {raw.strip()!r}."
            ) from None
    return heads
