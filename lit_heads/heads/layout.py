"""Where the attention heads are in a Hugging Face causal LM.

`find_heads(model)` returns a `HeadLayout`: per layer, the attention output projection (whose *input*
is the concatenation of the head outputs, the tensor AP scoring hooks) and slice descriptors telling
which rows/columns of which parameters belong to one query head or one KV group. Head-restricted
training (restrict.py) and scoring (scoring.py) both build on it, so every architecture is described
once, here, in `ARCHITECTURES`.

Adding an architecture: add an `_ArchSpec` entry to `ARCHITECTURES` keyed by `config.model_type`,
naming the path from the base model to its decoder layers, the attention attribute of a layer, the
output projection, and how q/k/v rows are laid out (separate projections, or one of the fused
layouts below). Then add the type to the parametrised layout tests (tests/test_heads_layout.py),
which check every slice against the model's own forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lit_heads.errors import ModelError

__all__ = [
    "ARCHITECTURES",
    "HeadLayout",
    "LayerHeads",
    "ParamSlice",
    "find_heads",
    "supported_architectures",
    "unwrap_model",
]


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """The part of one parameter that belongs to a head: `param.index_select(dim, index)`.

    `name` is the parameter's qualified name relative to the model given to `find_heads` (so it
    matches `model.named_parameters()` of that object). Several slices may point into the same
    parameter (fused qkv projections).
    """

    param: nn.Parameter
    name: str
    dim: int
    index: torch.LongTensor

    def _index_on(self, device: torch.device) -> torch.Tensor:
        # The model may have been moved after `find_heads`; indices follow it lazily.
        return self.index if self.index.device == device else self.index.to(device)

    def select(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The slice of `tensor` (default: the parameter itself; e.g. pass `param.grad`)."""
        t = self.param if tensor is None else tensor
        return t.index_select(self.dim, self._index_on(t.device))

    def mask(self) -> torch.Tensor:
        """A bool tensor shaped like the parameter, True on this slice."""
        m = torch.zeros(self.param.shape, dtype=torch.bool, device=self.param.device)
        m.index_fill_(self.dim, self._index_on(m.device), True)
        return m

    @property
    def numel(self) -> int:
        per_index = self.param.numel() // self.param.shape[self.dim]
        return per_index * int(self.index.numel())


# How the rows of one projection are laid out: (kind, head_or_group) -> output-feature indices.
_RowFn = Callable[[int], torch.Tensor]


@dataclass(eq=False)
class _Proj:
    """One q/k/v projection module and how to find a head's output features in it."""

    module: nn.Module
    name: str  # qualified module name
    out_dim: int  # dim of `weight` indexing output features (0 for nn.Linear, 1 for GPT-2 Conv1D)
    rows: _RowFn


@dataclass(eq=False)
class LayerHeads:
    """The heads of one decoder layer."""

    index: int
    attention: nn.Module
    o_proj: nn.Module
    o_proj_name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    _q: _Proj = field(repr=False)
    _k: _Proj = field(repr=False)
    _v: _Proj = field(repr=False)
    _o_in_dim: int = field(repr=False, default=1)  # dim of o_proj.weight indexing its input features
    _param_names: dict[int, str] = field(repr=False, default_factory=dict)

    # -- groups ---------------------------------------------------------------------------------
    def kv_group_of(self, head: int) -> int:
        self._check_head(head)
        return head // (self.n_heads // self.n_kv_heads)

    def heads_of_group(self, group: int) -> list[int]:
        self._check_group(group)
        per = self.n_heads // self.n_kv_heads
        return list(range(group * per, (group + 1) * per))

    # -- slices ---------------------------------------------------------------------------------
    def query_slices(self, head: int) -> list[ParamSlice]:
        """q rows of query head `head` (weight and bias, where there is a bias)."""
        self._check_head(head)
        return self._proj_slices(self._q, head)

    def kv_slices(self, group: int) -> list[ParamSlice]:
        """k and v rows of KV group `group` (shared by `heads_of_group(group)`), with biases."""
        self._check_group(group)
        return self._proj_slices(self._k, group) + self._proj_slices(self._v, group)

    def output_slices(self, head: int) -> list[ParamSlice]:
        """Input columns of the output projection that read head `head`. The o bias is shared by
        all heads and is therefore never part of a head's slices."""
        self._check_head(head)
        w = self.o_proj.weight
        idx = self._head_range(head, w.device)
        return [ParamSlice(w, self._pname(w, self.o_proj_name + ".weight"), self._o_in_dim, idx)]

    # -- internals ------------------------------------------------------------------------------
    def _head_range(self, i: int, device) -> torch.Tensor:
        return torch.arange(i * self.head_dim, (i + 1) * self.head_dim, device=device)

    def _pname(self, p: nn.Parameter, fallback: str) -> str:
        return self._param_names.get(id(p), fallback)

    def _proj_slices(self, proj: _Proj, i: int) -> list[ParamSlice]:
        rows = proj.rows(i)
        out = []
        w = proj.module.weight
        out.append(ParamSlice(w, self._pname(w, proj.name + ".weight"), proj.out_dim, rows.to(w.device)))
        b = getattr(proj.module, "bias", None)
        if isinstance(b, nn.Parameter):
            out.append(ParamSlice(b, self._pname(b, proj.name + ".bias"), 0, rows.to(b.device)))
        return out

    def _check_head(self, head: int) -> None:
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: layer {self.index} has {self.n_heads} query heads")

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.n_kv_heads:
            raise IndexError(f"KV group {group} out of range: layer {self.index} has {self.n_kv_heads} KV heads")


@dataclass(eq=False)
class HeadLayout:
    """Where the heads of a model are. `layers[l].o_proj` is the module whose input, viewed as
    [batch, seq, n_heads, head_dim], holds the head outputs of layer l."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layers: list[LayerHeads]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_group_of(self, head: int) -> int:
        return head // self.heads_per_group

    def heads_of_group(self, group: int) -> list[int]:
        per = self.heads_per_group
        return list(range(group * per, (group + 1) * per))


# ------------------------------------------------------------------------------------------------
# Architecture registry


@dataclass(frozen=True)
class _ArchSpec:
    layers_path: str  # from the base model (`model.base_model`) to the ModuleList of decoder layers
    attn_attr: str  # attention module inside a layer
    o_proj: str  # output projection inside the attention module
    qkv: str  # "separate" | "phi3" | "gpt2" | "neox"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    fused: str = ""  # name of the fused projection for fused layouts
    note: str = ""


_LLAMA_LIKE = _ArchSpec(layers_path="layers", attn_attr="self_attn", o_proj="o_proj", qkv="separate")

ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _ArchSpec(layers_path="layers", attn_attr="self_attn", o_proj="o_proj", qkv="phi3", fused="qkv_proj"),
    "gpt2": _ArchSpec(layers_path="h", attn_attr="attn", o_proj="c_proj", qkv="gpt2", fused="c_attn"),
    "gpt_neox": _ArchSpec(
        layers_path="layers", attn_attr="attention", o_proj="dense", qkv="neox", fused="query_key_value"
    ),
    "opt": _ArchSpec(layers_path="decoder.layers", attn_attr="self_attn", o_proj="out_proj", qkv="separate"),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip wrappers that hide the HF model: DDP/DataParallel (`.module`) and torch.compile
    (`._orig_mod`)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_heads(model: nn.Module) -> HeadLayout:
    """Locate the attention heads of a Hugging Face causal LM (the *ForCausalLM or its base model).

    Raises `ModelError` for an architecture that is not in `ARCHITECTURES` or whose modules do not
    match the registry entry (e.g. a modified model class).
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if config is None or arch is None:
        raise ModelError(
            f"find_heads needs a Hugging Face transformers model with a `.config.model_type`; got "
            f"{type(model).__name__}. Pass the *ForCausalLM (or its base model) loaded with transformers."
        )
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise ModelError(
            f"Architecture {arch!r} ({type(model).__name__}) is not supported for head scoring. Supported "
            f"model types: {', '.join(supported_architectures())}. To add one, add an entry for {arch!r} to "
            f"ARCHITECTURES in lit_heads/heads/layout.py naming its decoder-layer path, attention module, "
            f"output projection and q/k/v layout, and add it to tests/test_heads_layout.py."
        )

    n_heads = _config_int(config, "num_attention_heads", "n_head")
    n_kv = _config_int(config, "num_key_value_heads") or n_heads
    hidden = _config_int(config, "hidden_size", "n_embd")
    if n_heads is None or hidden is None:
        raise ModelError(f"{arch} config lacks num_attention_heads/hidden_size; cannot locate heads.")
    # GPT-2, GPT-NeoX and OPT always split hidden evenly; Llama-style models may set head_dim freely
    # (Gemma: 256 with hidden 2048/3072), so the config value wins where the architecture reads it.
    head_dim = _config_int(config, "head_dim") if spec.qkv in ("separate", "phi3") and arch != "opt" else None
    head_dim = head_dim or hidden // n_heads
    if n_heads % n_kv:
        raise ModelError(f"{arch}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}.")

    base = model.base_model if hasattr(model, "base_model") else model
    try:
        layer_list = _get_path(base, spec.layers_path)
    except AttributeError:
        raise ModelError(
            f"{arch}: expected decoder layers at `{spec.layers_path}` of {type(base).__name__} but found none; "
            f"the model class does not match the registry entry in lit_heads/heads/layout.py."
        ) from None

    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    layers: list[LayerHeads] = []
    for li, layer in enumerate(layer_list):
        try:
            attn = getattr(layer, spec.attn_attr)
            o_proj = getattr(attn, spec.o_proj)
            if spec.qkv == "separate":
                mods = [getattr(attn, n) for n in (spec.q, spec.k, spec.v)]
            else:
                mods = [getattr(attn, spec.fused)]
        except AttributeError as e:
            raise ModelError(
                f"{arch}: layer {li} does not have the modules the registry expects ({e}); the model class "
                f"does not match its entry in lit_heads/heads/layout.py."
            ) from None
        q, k, v, o_in_dim = _projections(spec, mods, module_names, n_heads, n_kv, head_dim, hidden)
        o_in = o_proj.weight.shape[o_in_dim]
        if o_in != n_heads * head_dim:
            raise ModelError(
                f"{arch}: layer {li} output projection reads {o_in} features but the config says "
                f"{n_heads} heads x head_dim {head_dim} = {n_heads * head_dim}; check config.head_dim."
            )
        layers.append(
            LayerHeads(
                index=li,
                attention=attn,
                o_proj=o_proj,
                o_proj_name=module_names.get(id(o_proj), f"layers.{li}.{spec.o_proj}"),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                _q=q,
                _k=k,
                _v=v,
                _o_in_dim=o_in_dim,
                _param_names=param_names,
            )
        )
    if not layers:
        raise ModelError(f"{arch}: the model has no decoder layers.")
    return HeadLayout(arch=arch, n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, layers=layers)


def _block(i: int, size: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + i * size, offset + (i + 1) * size)


def _projections(spec: _ArchSpec, mods, names, n_heads, n_kv, hd, hidden):
    """(q, k, v, o_in_dim) for one layer."""
    if spec.qkv == "separate":
        qm, km, vm = mods
        return (
            _Proj(qm, names.get(id(qm), spec.q), 0, lambda h: _block(h, hd)),
            _Proj(km, names.get(id(km), spec.k), 0, lambda g: _block(g, hd)),
            _Proj(vm, names.get(id(vm), spec.v), 0, lambda g: _block(g, hd)),
            1,
        )
    (m,) = mods
    name = names.get(id(m), spec.fused)
    if spec.qkv == "phi3":
        # qkv_proj rows: [q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)]
        return (
            _Proj(m, name, 0, lambda h: _block(h, hd)),
            _Proj(m, name, 0, lambda g: _block(g, hd, n_heads * hd)),
            _Proj(m, name, 0, lambda g: _block(g, hd, (n_heads + n_kv) * hd)),
            1,
        )
    if spec.qkv == "gpt2":
        # Conv1D stores weight as [in, out]: c_attn output features (q|k|v, each `hidden` wide) are
        # dim 1, and c_proj's input features (the head outputs) are dim 0.
        return (
            _Proj(m, name, 1, lambda h: _block(h, hd)),
            _Proj(m, name, 1, lambda g: _block(g, hd, hidden)),
            _Proj(m, name, 1, lambda g: _block(g, hd, 2 * hidden)),
            0,
        )
    if spec.qkv == "neox":
        # query_key_value output is viewed [n_heads, 3 * hd] and chunked into q, k, v per head.
        return (
            _Proj(m, name, 0, lambda h: _block(0, hd, h * 3 * hd)),
            _Proj(m, name, 0, lambda g: _block(1, hd, g * 3 * hd)),
            _Proj(m, name, 0, lambda g: _block(2, hd, g * 3 * hd)),
            1,
        )
    raise AssertionError(spec.qkv)
