"""Train only selected attention heads, PEFT-style: frozen base weights plus small trainable deltas.

Why deltas instead of gradient masks: zeroing the gradient of "frozen" rows with hooks is a known
trap, because AdamW's weight decay (and momentum from earlier steps) still moves them. Here the base
tensors have ``requires_grad=False`` and are never handed to an optimizer, so nothing can move them.
Each trained part of a parameter gets its own ``nn.Parameter`` holding only those rows/columns:

    W_eff = W.index_add(dim, index, delta)        # out of place; W gets no grad, delta does

applied with ``torch.nn.utils.parametrize``, so every read of ``module.weight`` (by any forward
implementation: eager, SDPA, flash) sees ``W_eff``. Optimizer state therefore scales with the
trained slice, not the full matrix, and ``merge()`` folds the deltas back into plain weights.

What a selected query head ``h`` of layer ``l`` trains:

- its rows of the query projection (weight, and bias where there is one);
- its input columns of the attention output projection (the o bias is shared by all heads and
  stays frozen);
- with ``kv="group"`` (default), the key and value rows (and biases) of the KV group that ``h``
  reads. Under grouped-query attention those rows are *shared* with the other query heads of the
  group, so training them also changes what the unselected heads of that group compute. The count
  in ``describe()`` includes these rows once per group. With ``kv="none"`` keys and values stay
  frozen and only the selected heads' own q rows and o columns train.

``train_norms=True`` / ``train_mlp=True`` additionally train every normalisation layer / every MLP
(feed-forward or MoE block) whole, through a full-size delta, so they follow the same rules (frozen
base, merge at the end).

Weight decay applies to the deltas only, so AdamW decays the *change* toward 0, i.e. pulls trained
weights toward their pretrained values, never toward zero. Entries outside the selection stay
bit-identical through any number of optimizer steps, and after ``merge()`` too.

Checkpoints: the deltas are submodules of the model (under ``<module>.parametrizations.<name>``),
so ``model.state_dict()`` (and a Lightning checkpoint) holds them. To resume, restrict a fresh
model with the same heads and options *before* loading the state dict; a checkpoint made with other
heads is refused with a clear error. Note the base weights appear under
``...parametrizations.weight.original`` while restricted; ``merge()`` restores plain names.

Typical use::

    restriction = HeadRestriction(model, heads, kv="group").apply()
    optimizer = torch.optim.AdamW(restriction.trainable_parameters(), lr=1e-4, weight_decay=0.01)
    ...  # train
    restriction.merge()
    model.save_pretrained(out_dir)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_heads.errors import ConfigError, ModelError
from lit_heads.heads.layout import find_heads, unwrap_model
from lit_heads.heads.selection import select_heads

KV_POLICIES = ("group", "none")
KINDS = ("q", "k", "v", "o", "norm", "mlp")

# Attribute names under which Hugging Face decoder layers keep their feed-forward block (OPT has no
# block module, only fc1/fc2 on the layer). Every parameter below a matching module trains.
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "fc1", "fc2")


class HeadDelta(nn.Module):
    """Parametrization ``W -> W + delta`` on the entries ``index`` of dimension ``dim`` of ``W``.

    ``index=None`` means the whole tensor (``delta`` has ``W``'s shape). The delta starts at zero,
    so a freshly restricted model computes exactly what the base model computes.
    """

    def __init__(self, base: torch.Tensor, dim: int, index: torch.Tensor | None):
        super().__init__()
        self.dim = dim
        shape = list(base.shape)
        if index is not None:
            shape[dim] = len(index)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=base.dtype, device=base.device))
        # Persistent, so a checkpoint records which rows its delta belongs to (checked on load).
        self.register_buffer("index", index)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return base + self.delta
        return base.index_add(self.dim, self.index, self.delta)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        saved = state_dict.get(prefix + "index")
        mine = self.index
        if saved is not None and (mine is None or not torch.equal(saved.cpu(), mine.cpu())):
            raise ConfigError(
                f"The checkpoint's head delta {prefix.rstrip('.')} covers other rows than this model's "
                "restriction, so it was trained on a different head selection (or kv/train_norms/"
                "train_mlp options). Restrict the model with the same heads and options the "
                "checkpoint was trained with before loading it."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        rows = "all" if self.index is None else len(self.index)
        return f"dim={self.dim}, rows={rows}, delta={tuple(self.delta.shape)}"


@dataclass(eq=False)
class _Site:
    """One parameter to train in part or whole, and where it lives."""

    param: nn.Parameter
    name: str
    dim: int = 0
    rows: dict[str, set[int]] = field(default_factory=dict)  # kind -> rows along `dim`
    whole: str | None = None  # kind, when the whole tensor trains
    module: nn.Module | None = None
    attr: str = ""
    delta: HeadDelta | None = None

    def index(self) -> torch.Tensor | None:
        if self.whole is not None:
            return None
        rows = sorted(set().union(*self.rows.values()))
        if len(rows) == self.param.shape[self.dim]:
            return None  # every row is selected: a plain add is cheaper than index_add
        return torch.tensor(rows, dtype=torch.long, device=self.param.device)

    def counts(self) -> dict[str, int]:
        if self.whole is not None:
            return {self.whole: self.param.numel()}
        per_row = self.param.numel() // self.param.shape[self.dim]
        return {kind: per_row * len(rows) for kind, rows in self.rows.items()}


class HeadRestriction:
    """Restrict training of ``model`` to the attention heads ``heads`` (see the module docstring).

    ``heads`` are ``(layer, query_head)`` pairs. ``apply()`` freezes every parameter of the model
    and attaches zero-initialised deltas; ``trainable_parameters()`` are what the optimizer gets.
    ``merge()`` folds the deltas into the weights and returns a plain model; ``remove()`` discards
    them. Both restore the parameters' original ``requires_grad`` flags.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: list[tuple[int, int]],
        *,
        kv: str = "group",
        train_norms: bool = False,
        train_mlp: bool = False,
    ):
        if kv not in KV_POLICIES:
            raise ConfigError(
                f"Unknown key/value policy kv={kv!r}. Use 'group' (train the K/V rows of every KV "
                "group that contains a selected head; shared with that group's other query heads) "
                "or 'none' (keys and values stay frozen)."
            )
        self.model = unwrap_model(model)
        self.heads = list(heads)
        self.kv = kv
        self.train_norms = bool(train_norms)
        self.train_mlp = bool(train_mlp)
        self.kv_groups: list[tuple[int, int]] = []
        self._sites: list[_Site] = []
        self._requires_grad: dict[int, bool] = {}
        self._total = 0

    # -- public API --------------------------------------------------------------------------------

    @property
    def applied(self) -> bool:
        return bool(self._sites)

    def apply(self) -> "HeadRestriction":
        """Freeze the model and attach the deltas. Returns ``self``."""
        model = self.model
        if self.applied or any(parametrize.is_parametrized(m) for m in model.modules()):
            raise ConfigError(
                "This model already has parametrized weights (it is already head-restricted, or "
                "uses torch parametrizations of its own). Call merge() or remove() on the existing "
                "HeadRestriction first, or restrict a freshly loaded model."
            )
        layout = find_heads(model)
        self.heads = select_heads("list", layout.n_layers, layout.n_heads, heads=self.heads)
        sites = self._plan(model, layout)

        owners = _owners(model)
        params = list(model.parameters())
        self._total = sum(p.numel() for p in params)
        self._requires_grad = {id(p): p.requires_grad for p in params}
        for p in params:
            p.requires_grad_(False)
        for site in sites:
            found = owners.get(id(site.param), [])
            if len(found) != 1:
                raise ModelError(
                    f"Cannot restrict {site.name}: it is shared by {len(found)} modules (tied "
                    "weights), and training part of it through one of them would untie them. "
                    "Restricted training supports untied attention, norm and MLP weights only."
                )
            site.module, site.attr = found[0]
            site.delta = HeadDelta(site.param, site.dim, site.index())
            parametrize.register_parametrization(site.module, site.attr, site.delta)
        self._sites = sites
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The deltas: the only tensors the optimizer should see."""
        self._check_applied("trainable_parameters")
        return [site.delta.delta for site in self._sites]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name of the base parameter, delta)`` pairs, e.g. for logging or param groups."""
        self._check_applied("named_trainable_parameters")
        return [(site.name, site.delta.delta) for site in self._sites]

    def count_trainable(self) -> int:
        """Exact number of trained scalars (each counted once)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def describe(self) -> dict:
        """Counts for printing: trained scalars in total and per kind, and the share of the model."""
        self._check_applied("describe")
        by_kind = dict.fromkeys(KINDS, 0)
        for site in self._sites:
            for kind, n in site.counts().items():
                by_kind[kind] += n
        trainable = self.count_trainable()
        return {
            "heads": len(self.heads),
            "kv_policy": self.kv,
            "kv_groups": len(self.kv_groups),
            "trainable": trainable,
            "by_kind": by_kind,
            "total": self._total,
            "fraction": trainable / self._total,
        }

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the deltas into the base weights in place and drop the parametrizations.

        The parameters keep their identity (same ``nn.Parameter`` objects), and the model is a
        plain Hugging Face model again: ``save_pretrained`` writes ordinary weight names.
        """
        self._check_applied("merge")
        for site in self._sites:
            merged = getattr(site.module, site.attr)
            parametrize.remove_parametrizations(site.module, site.attr, leave_parametrized=False)
            site.param.copy_(merged)
        return self._release()

    def remove(self) -> nn.Module:
        """Discard the deltas: the model returns to its exact pre-``apply()`` weights."""
        self._check_applied("remove")
        for site in self._sites:
            parametrize.remove_parametrizations(site.module, site.attr, leave_parametrized=False)
        return self._release()

    # -- internals ---------------------------------------------------------------------------------

    def _plan(self, model: nn.Module, layout) -> list[_Site]:
        """One `_Site` per parameter, with the rows of every kind merged, so nothing overlaps."""
        sites: dict[int, _Site] = {}

        def add(kind: str, slices) -> None:
            for s in slices:
                site = sites.setdefault(id(s.param), _Site(s.param, s.name, s.dim))
                if site.dim != s.dim:
                    # No supported layout slices one parameter along two dims; if one ever did,
                    # per-dim deltas would overlap and double-train the shared entries.
                    raise ModelError(
                        f"{s.name} is sliced along dims {site.dim} and {s.dim}; head-restricted "
                        "training needs one slicing dim per parameter (a layout bug in "
                        "lit_heads/heads/layout.py)."
                    )
                site.rows.setdefault(kind, set()).update(s.index.tolist())

        groups = set()
        for layer_idx, head in self.heads:
            layer = layout.layers[layer_idx]
            add("q", layer.query_slices(head))
            add("o", layer.output_slices(head))
            groups.add((layer_idx, layer.kv_group_of(head)))
        self.kv_groups = sorted(groups) if self.kv == "group" else []
        for layer_idx, group in self.kv_groups:
            add("k", layout.layers[layer_idx].key_slices(group))
            add("v", layout.layers[layer_idx].value_slices(group))

        names = {id(p): n for n, p in model.named_parameters()}
        for kind, enabled, params in (
            ("norm", self.train_norms, _norm_params),
            ("mlp", self.train_mlp, _mlp_params),
        ):
            if not enabled:
                continue
            found = params(model)
            if not found:
                raise ConfigError(
                    f"train_{'norms' if kind == 'norm' else 'mlp'}=True, but no "
                    f"{'normalisation layers' if kind == 'norm' else 'MLP blocks'} were found in "
                    f"{type(model).__name__}. Set it to False for this model."
                )
            for p in found:
                site = sites.setdefault(id(p), _Site(p, names[id(p)]))
                # A parameter already claimed whole (a norm inside an MLP block) is counted once.
                site.whole = site.whole or kind
        return list(sites.values())

    def _check_applied(self, what: str) -> None:
        if not self.applied:
            raise ConfigError(
                f"HeadRestriction.{what}() needs an applied restriction: call apply() first "
                "(merge() and remove() end a restriction)."
            )

    def _release(self) -> nn.Module:
        for p in self.model.parameters():
            p.requires_grad_(self._requires_grad.get(id(p), p.requires_grad))
        self._sites = []
        return self.model


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    return owners


def _norm_params(model: nn.Module) -> list[nn.Parameter]:
    # HF norm classes are all named *Norm (LayerNorm, LlamaRMSNorm, Gemma2RMSNorm, ...).
    return _unique(
        p for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)
    )


def _mlp_params(model: nn.Module) -> list[nn.Parameter]:
    return _unique(
        p
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in MLP_NAMES
        for p in m.parameters()
    )


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# The key under which the `HeadRestrictedFinetuning` callback keeps its state (heads and options) in
# a Lightning checkpoint's "callbacks" section; the callback uses it as its `state_key`.
CHECKPOINT_STATE_KEY = "HeadRestrictedFinetuning"


def restriction_from_checkpoint(model: nn.Module, checkpoint: dict) -> HeadRestriction | None:
    """An applied HeadRestriction on ``model`` matching a checkpoint written with head-restricted
    SFT, so its (parametrized) state dict loads; None when the checkpoint has no such state."""
    states = checkpoint.get("callbacks") or {}
    state = next((s for key, s in states.items() if str(key).startswith(CHECKPOINT_STATE_KEY)), None)
    if state is None:
        return None
    heads = [tuple(h) for h in state["heads"]]
    options = {k: state[k] for k in ("kv", "train_norms", "train_mlp")}
    return HeadRestriction(model, heads, **options).apply()
