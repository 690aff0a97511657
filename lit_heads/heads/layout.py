"""Where the attention heads are in a Hugging Face causal LM, discovered from the model itself.

`find_heads(model)` returns a `HeadLayout`: per decoder layer, the attention module, its output
projection (whose *input* is the concatenation of the head outputs, the tensor AP scoring hooks) and
slice descriptors telling which rows/columns of which parameters belong to one query head or one KV
group. Head-restricted training (restrict.py) and scoring (scoring.py) both build on it.

Nothing here is registered per architecture. Discovery has two parts:

1. Structure, from the config and the module tree: the decoder layers are the `ModuleList` of the
   decoder (`get_decoder()`) with `num_hidden_layers` entries; a layer's attention is its outermost
   submodule whose class is named like an attention module; the number of query heads comes from
   the config (`num_attention_heads`, whatever the config calls it).
2. Function, from one short forward pass (`_probe`), which is what makes fused and unusual layouts
   exact without knowing them by name. The output projection is the last linear the attention module
   calls; head_dim is its input width / heads. Every other linear the attention calls is cut into
   head_dim-sized blocks of output features, and each block is negated in its own batch row, once
   at every position and once at every position but the last. Which head columns of the output
   projection's input then change, and how, tells for each block the head(s) it feeds and its role:
   a query block changes one head and leaves the last position alone when only earlier positions
   are negated (that position is computed from its own query); a key or value block changes all
   heads of one KV group, the last position included; a value block negates those heads' outputs
   exactly (attention is linear in the values). Negation keeps the norm of the whole projection
   output, so models that normalise q or k across all heads (OLMo 2) are probed correctly. Batch
   rows are computed independently, so a head that a block does not feed stays equal to the
   baseline row (up to a few float32 ulps). The forward stops after the last probed layer, so the
   probe costs about one layer on a few dozen 5-token rows; its result is cached per model object.

Whatever does not fit (a block that feeds several query heads, overlapping KV groups, layers with
different head counts, attention in only some layers, no attention at all) raises `ModelError`
saying what was found: discovery never guesses. `ARCHITECTURES` holds overrides only: module paths
for a model whose structure discovery cannot read, or a refusal with a reason.
"""

from __future__ import annotations

import copy
import inspect
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lit_heads._internals import compiled_original
from lit_heads.errors import ModelError

__all__ = [
    "ARCHITECTURES",
    "HeadLayout",
    "HeadsNotFound",
    "LayerHeads",
    "Override",
    "ParamSlice",
    "eval_mode",
    "find_heads",
    "unwrap_model",
]


class HeadsNotFound(ModelError):
    """`find_heads` cannot describe this model's heads. `kind` says why, in words the
    architecture table uses: "no attention", "no heads", "hybrid", "heads mixed", "not runnable",
    "unsupported", "refused"; "no weights" where only the loaded model can tell (a meta-device model
    that neither a twin nor the structure settles)."""

    def __init__(self, message: str, kind: str = "unsupported"):
        super().__init__(message)
        self.kind = kind


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


@dataclass(eq=False)
class _Proj:
    """One projection module and, for one role (q, k or v), the output features of each head
    (q) or KV group (k, v) in it."""

    module: nn.Module
    name: str  # qualified module name
    out_dim: int  # dim of `weight` indexing output features (0 for nn.Linear, 1 for GPT-2's Conv1D)
    rows: dict[int, torch.Tensor]


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
    _q: list[_Proj] = field(repr=False)
    _k: list[_Proj] = field(repr=False)
    _v: list[_Proj] = field(repr=False)
    _groups: tuple[tuple[int, ...], ...] = field(repr=False)  # query heads of each KV group
    _o_in_dim: int = field(repr=False, default=1)  # dim of o_proj.weight indexing its input features
    _param_names: dict[int, str] = field(repr=False, default_factory=dict)

    # -- groups ---------------------------------------------------------------------------------
    def kv_group_of(self, head: int) -> int:
        self._check_head(head)
        return next(g for g, members in enumerate(self._groups) if head in members)

    def heads_of_group(self, group: int) -> list[int]:
        self._check_group(group)
        return list(self._groups[group])

    # -- slices ---------------------------------------------------------------------------------
    def query_slices(self, head: int) -> list[ParamSlice]:
        """Rows of query head `head` in the projections that feed only it (its q rows, and the
        rows of a per-head output gate where the model has one), weight and bias."""
        self._check_head(head)
        return self._proj_slices(self._q, head)

    def key_slices(self, group: int) -> list[ParamSlice]:
        """k rows (and biases) of KV group `group`."""
        self._check_group(group)
        return self._proj_slices(self._k, group)

    def value_slices(self, group: int) -> list[ParamSlice]:
        """v rows (and biases) of KV group `group`."""
        self._check_group(group)
        return self._proj_slices(self._v, group)

    def kv_slices(self, group: int) -> list[ParamSlice]:
        """k and v rows of KV group `group` (shared by `heads_of_group(group)`), with biases."""
        return self.key_slices(group) + self.value_slices(group)

    def output_slices(self, head: int) -> list[ParamSlice]:
        """Input columns of the output projection that read head `head`. The o bias is shared by
        all heads and is therefore never part of a head's slices."""
        self._check_head(head)
        w = _weight(self.o_proj)
        idx = torch.arange(head * self.head_dim, (head + 1) * self.head_dim)
        return [ParamSlice(w, self._pname(w, self.o_proj_name + ".weight"), self._o_in_dim, _readable_on(idx, w))]

    # -- internals ------------------------------------------------------------------------------
    def _pname(self, p: nn.Parameter, fallback: str) -> str:
        return self._param_names.get(id(p), fallback)

    def _proj_slices(self, projs: list[_Proj], i: int) -> list[ParamSlice]:
        out = []
        for proj in projs:
            rows = proj.rows.get(i)
            if rows is None:
                continue
            w = _weight(proj.module)
            out.append(ParamSlice(w, self._pname(w, proj.name + ".weight"), proj.out_dim, _readable_on(rows, w)))
            b = _bias(proj.module)
            if b is not None:
                out.append(ParamSlice(b, self._pname(b, proj.name + ".bias"), 0, _readable_on(rows, b)))
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
    [batch, seq, n_heads, layers[l].head_dim], holds the head outputs of layer l.

    Every layer has `n_heads` query heads. `head_dim` and `n_kv_heads` are None where layers differ
    in them (Gemma 4's full-attention layers have wider heads than its sliding ones); each layer's
    own values are on `layers[l]`.
    """

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    head_dim: int | None
    layers: list[LayerHeads]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def heads_per_group(self) -> int | None:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else None


# ------------------------------------------------------------------------------------------------
# Overrides


@dataclass(frozen=True)
class Override:
    """What to tell `find_heads` about one `config.model_type` that it cannot work out alone.

    layers: path from `model.get_decoder()` to the ModuleList of decoder layers;
    attention: path from a decoder layer to its attention module;
    refuse: a reason; `find_heads` then raises `HeadsNotFound` with it (kind "refused").
    The slices are always probed (see the module docstring), never taken from here.
    """

    layers: str | None = None
    attention: str | None = None
    refuse: str | None = None


# Empty on purpose: every model type of the installed transformers that lit_heads supports is found
# without help (README, "Supported architectures"). Add an entry only for a model whose structure
# discovery cannot read.
ARCHITECTURES: dict[str, Override] = {}


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip wrappers that hide the HF model: DDP/DataParallel (`.module`) and torch.compile
    (`._orig_mod`)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif (inner := compiled_original(model)) is not None:
            model = inner
        else:
            break
    return model


# ------------------------------------------------------------------------------------------------
# Linear-like modules


def _readable_on(index: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The index on the parameter's device, except for a meta parameter: there it stays readable (CPU)."""
    return index if param.device.type == "meta" else index.to(param.device)


def _weight(module: nn.Module) -> nn.Parameter:
    # A head-restricted module's `weight` is computed by a parametrization; the parameter that
    # slices must point at is the original one underneath.
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _bias(module: nn.Module) -> nn.Parameter | None:
    if parametrize.is_parametrized(module, "bias"):
        return module.parametrizations.bias.original
    b = getattr(module, "bias", None)
    return b if isinstance(b, nn.Parameter) else None


def _out_dim(module: nn.Module) -> int | None:
    """Which dim of `weight` indexes output features, or None for a module that is not a linear
    map with a [out, in] or [in, out] weight."""
    if isinstance(module, nn.Linear):
        return 0
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    # transformers' Conv1D (GPT-2 family) stores [in, out] and names its sizes nx (in), nf (out).
    if getattr(module, "nf", None) == w.shape[1] and getattr(module, "nx", None) == w.shape[0]:
        return 1
    if getattr(module, "out_features", None) == w.shape[0] and getattr(module, "in_features", None) == w.shape[1]:
        return 0
    return None


def _in_width(module: nn.Module) -> int:
    return _weight(module).shape[1 - _out_dim(module)]


def _out_width(module: nn.Module) -> int:
    return _weight(module).shape[_out_dim(module)]


# ------------------------------------------------------------------------------------------------
# Structure

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_HEAD_COUNT_NAMES = ("num_attention_heads", "n_head", "num_heads", "n_heads")


_LAYER_COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# The twin that stands in for a model without weights (see _probe_twin): vocabulary and MLP width.
_TWIN_VOCAB = 512
_TWIN_MLP = 256


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:
        return get()


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def _decoder_layers(model: nn.Module, text_config, override: Override | None, arch: str) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if override is not None and override.layers:
        try:
            return _get_path(decoder, override.layers)
        except AttributeError:
            raise HeadsNotFound(
                f"{arch}: the override in lit_heads/heads/layout.py ARCHITECTURES says the decoder layers are at "
                f"`{override.layers}` of {type(decoder).__name__}, but there is nothing there."
            ) from None
    n_layers = _config_int(text_config, *_LAYER_COUNT_NAMES)
    found: list[tuple[str, nn.ModuleList]] = []
    lists: list[tuple[str, nn.ModuleList]] = []
    # The decoder first; the whole model where `get_decoder()` names something else (a head).
    for root in (decoder, model) if decoder is not model else (model,):
        lists = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        with_attention = [(n, m) for n, m in lists if _attention_candidates(m[0])]
        sized = [(n, m) for n, m in with_attention if len(m) == n_layers]
        found = sized or with_attention
        # Nested lists (e.g. several attentions per layer): the outermost ones.
        found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
        if found:
            break
    if not found:
        found = [(n, m) for n, m in lists if len(m) == n_layers]  # no attention anywhere: say so below
    if len(found) > 1:
        # E.g. a vision tower next to the text decoder: the decoder is the list that runs on text.
        ran = _which_ran(model, [m[0] for _, m in found], arch)
        found = [f for f, r in zip(found, ran) if r]
    if len(found) == 1:
        return found[0][1]
    listed = ", ".join(f"`{n or '.'}` ({len(m)} x {type(m[0]).__name__})" for n, m in (found or lists)[:8]) or "none"
    raise HeadsNotFound(
        f"{arch} ({type(model).__name__}): cannot tell which module list holds the decoder layers: the config "
        f"says num_hidden_layers={n_layers}, and these lists {'run on text' if found else 'exist'}: {listed}. "
        f"Add Override(layers=...) for {arch!r} to ARCHITECTURES in lit_heads/heads/layout.py."
    )


def _which_ran(model: nn.Module, modules: list[nn.Module], arch: str) -> list[bool]:
    ran = [False] * len(modules)
    hooks = [m.register_forward_hook(lambda *a, i=i: ran.__setitem__(i, True)) for i, m in enumerate(modules)]
    _check_probeable(model, arch)
    with eval_mode(model):
        _run(model, _probe_ids(model, 1, _model_device(model)), hooks, arch)
    return ran


def _attention_candidates(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost submodules of `layer` named like attention that hold at least two linear maps (the
    layer itself where it is such a module)."""
    named = [
        (n, m) for n, m in layer.named_modules()
        if _ATTENTION_CLASS.search(type(m).__name__) and sum(_out_dim(s) is not None for s in m.modules()) >= 2
    ]
    inner = [(n, m) for n, m in named if n]
    if not inner:
        return named
    return [(n, m) for n, m in inner if not any(n.startswith(o + ".") for o, _ in inner)]


def _linears(attn: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention's linear maps, outermost only: a linear map inside another one is a wrapper's
    detail (PEFT's LoRA layer holds base_layer, lora_A and lora_B; its weight is base_layer's)."""
    found = [(n, m) for n, m in attn.named_modules() if n and _out_dim(m) is not None]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]


def _signature(attn: nn.Module) -> tuple:
    return (type(attn), tuple((n, type(m), tuple(_weight(m).shape)) for n, m in _linears(attn)))


# ------------------------------------------------------------------------------------------------
# The probe


class _StopProbe(Exception):
    """Raised by a hook once the last probed layer has run: the rest of the model is not needed."""


_T = 5  # tokens per probe row


def _forward_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if ("use_cache" in params or accepts_any) else {}


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (no dropout, no checkpointing) for a look at the model; every module's own mode
    is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def _run(model: nn.Module, ids: torch.Tensor, hooks: list, arch: str) -> None:
    try:
        with torch.no_grad():
            model(input_ids=ids, **_forward_kwargs(model))
    except _StopProbe:
        pass
    except HeadsNotFound:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the model's own forward is reported as such
        raise HeadsNotFound(
            f"{arch}: find_heads runs the model on {ids.shape[1]} token ids to locate its heads, and that forward "
            f"pass failed ({type(e).__name__}: {e}). A model that needs other inputs than input_ids (another "
            f"model's hidden states, audio codebooks) cannot be probed.", "not runnable") from e
    finally:
        for h in hooks:
            h.remove()


def _probe_ids(model: nn.Module, rows: int, device) -> torch.Tensor:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or 64
    # Ordinary token ids (past the usual special ids at the start), the same in every row, from a
    # private generator so the caller's RNG streams are untouched.
    g = torch.Generator().manual_seed(0)
    low = min(4, vocab - 1)
    row = torch.randint(low, max(low + 1, min(vocab, 200)), (_T,), generator=g)
    return row.expand(rows, _T).contiguous().to(device)


def _model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_probeable(model: nn.Module, arch: str) -> None:
    for name, p in model.named_parameters():
        if p.device.type == "meta" or type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            raise HeadsNotFound(
                f"{arch}: find_heads runs the model once on a few tokens to locate the heads, but parameter {name} "
                f"is {'on the meta device' if p.device.type == 'meta' else 'sharded (DTensor)'}. Call find_heads "
                f"on the loaded model before sharding it.", "no weights" if p.device.type == "meta" else "unsupported"
            )


def _probe_twin(model: nn.Module, arch: str, override: Override | None, probed: list[int],
                candidates: dict[int, list[tuple[str, nn.Module]]], n_heads: int) -> dict[int, _Plan]:
    """Probe a model that has no weights (the meta device: `lit_heads plan`, checks before loading)
    through a materialised twin: the same config with only the layers up to the last probed one and
    a small vocabulary and MLP, randomly initialised on the CPU. The probe reads the attention
    modules only, and the twin's are built from the same config; that they match is checked."""
    config = copy.deepcopy(model.config)
    text = _text_config(config)
    n_layers = _config_int(text, *_LAYER_COUNT_NAMES)
    keep = max(probed) + 1
    for name, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == n_layers:
            setattr(text, name, value[:keep])  # per-layer settings (e.g. layer_types)
    for name in _LAYER_COUNT_NAMES:
        if _config_int(text, name) is not None:
            setattr(text, name, keep)
    vocab = _config_int(text, "vocab_size")
    if vocab is not None and vocab > _TWIN_VOCAB:
        text.vocab_size = _TWIN_VOCAB
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(text, name, None)
            if isinstance(value, int) and value >= _TWIN_VOCAB:
                setattr(text, name, None)
            elif isinstance(value, list):
                setattr(text, name, [v for v in value if v < _TWIN_VOCAB] or None)
    if (_config_int(text, "intermediate_size") or 0) > _TWIN_MLP:
        text.intermediate_size = _TWIN_MLP  # the MLP is not probed
    try:
        with torch.device("cpu"):
            twin = type(model)(config)
    except Exception as e:  # noqa: BLE001 - any failure to build the twin is reported as such
        raise HeadsNotFound(
            f"{arch}: the model has no weights (meta device), so find_heads builds a small twin of it to locate the "
            f"heads, and that failed ({type(e).__name__}: {e}). Load the model's weights and call find_heads on it.",
            "no weights") from e
    twin_layers = _decoder_layers(twin, _text_config(twin.config), override, arch)
    twin_candidates = {li: _attention_candidates(twin_layers[li]) for li in probed}
    for li in probed:
        if [_signature(m) for _, m in twin_candidates[li]] != [_signature(m) for _, m in candidates[li]]:
            raise HeadsNotFound(
                f"{arch}: the model has no weights (meta device), and the small twin built from its config to locate "
                f"the heads has a different attention module in layer {li}. Load the model's weights and call "
                f"find_heads on it.", "no weights")
    with eval_mode(twin):
        return _probe(twin, arch, probed, twin_candidates, n_heads)


# A head counts as unchanged when its output moved by at most this much, relative to its own size.
# Batch rows are computed independently, so an unaffected head is in practice bit-identical to the
# baseline row, in any precision; a few float32 ulps of slack cover kernels that differ anyway.
_UNCHANGED = 4 * torch.finfo(torch.float32).eps


@dataclass
class _Plan:
    """What the probe found for one layer signature; reused for all layers sharing it."""

    attention: str  # path inside the layer
    o_proj: str  # path inside the attention module
    head_dim: int
    groups: tuple[tuple[int, ...], ...]
    roles: dict[str, dict[str, dict[int, list[int]]]]  # proj path -> role -> head/group -> rows


def _probe(model: nn.Module, arch: str, probed: list[int], candidates: dict[int, list[tuple[str, nn.Module]]],
           n_heads: int) -> dict[int, _Plan]:
    device = _model_device(model)
    last = max(probed)

    # Pass 1 (one row): which candidate attention runs, and the order of the linears it calls.
    calls: dict[int, list[tuple[str, str]]] = {li: [] for li in probed}
    hooks = []
    for li in probed:
        for an, attn in candidates[li]:
            for ln, lin in _linears(attn):
                hooks.append(lin.register_forward_hook(
                    lambda m, a, o, li=li, an=an, ln=ln: calls[li].append((an, ln))))
        if li == last:
            for _, attn in candidates[li]:
                hooks.append(attn.register_forward_hook(_raise_stop))
    _run(model, _probe_ids(model, 1, device), hooks, arch)

    structure = {}
    for li in probed:
        ran = sorted({an for an, _ in calls[li]})
        if len(ran) != 1:
            names = [an for an, _ in candidates[li]]
            raise HeadsNotFound(
                f"{arch}: layer {li} has attention-like modules {names}, and {len(ran)} of them ran on a plain "
                f"forward ({ran}); find_heads needs exactly one self-attention per layer. Add "
                f"Override(attention=...) for {arch!r} to ARCHITECTURES in lit_heads/heads/layout.py."
            )
        an = ran[0]
        attn = dict(candidates[li])[an]
        order = [ln for a, ln in calls[li] if a == an]
        o_name = order[-1]
        o_proj = _get_path(attn, o_name)
        o_in = _in_width(o_proj)
        if o_in % n_heads:
            raise HeadsNotFound(
                f"{arch}: layer {li}: the last linear map of {type(attn).__name__}, `{o_name}`, reads {o_in} "
                f"features, which do not split into the config's {n_heads} heads; it is not an output projection "
                f"over concatenated heads."
            )
        head_dim = o_in // n_heads
        projs = []
        for ln in dict.fromkeys(order[:-1]):
            if ln == o_name:
                continue
            m = _get_path(attn, ln)
            width = _out_width(m)
            # head_dim blocks; else one block per head; a projection narrower than the heads (a per-group
            # scalar, say) is probed feature by feature.
            block = head_dim if width % head_dim == 0 else (width // n_heads if width % n_heads == 0 else
                                                           (1 if width < n_heads else 0))
            if not block:
                raise HeadsNotFound(
                    f"{arch}: layer {li}: `{an}.{ln}` has {width} output features, which split neither into "
                    f"head_dim={head_dim} blocks nor into {n_heads} per-head blocks."
                )
            projs.append((ln, m, block))
        structure[li] = (an, attn, o_name, o_proj, head_dim, projs)

    # Pass 2: one baseline row, then per block of every projection a row negated at every
    # position ("global") and a row negated at every position but the last ("local").
    jobs = [(li, pi, b, kind) for li in probed for pi, (_, m, block) in enumerate(structure[li][5])
            for b in range(_out_width(m) // block) for kind in ("global", "local")]
    rows = 1 + len(jobs)
    signs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for r, (li, pi, b, kind) in enumerate(jobs, start=1):
        _, m, block = structure[li][5][pi]
        glob, loc = signs.setdefault((li, pi), (torch.ones(rows, _out_width(m)), torch.ones(rows, _out_width(m))))
        (glob if kind == "global" else loc)[r, b * block:(b + 1) * block] = -1
    captured = _signed_forward(model, arch, structure, probed, signs, rows)
    plans = {}
    for li in probed:
        an, attn, o_name, o_proj, head_dim, projs = structure[li]
        x = captured[li].float().view(rows, _T, n_heads, head_dim)
        mine = [(r, j) for r, j in enumerate(jobs, start=1) if j[0] == li]
        plans[li] = _read_probe(arch, li, an, o_name, x, mine, projs, n_heads, head_dim)

    # Pass 3: a model computing more, narrower heads than the config counts would pass the above,
    # every block feeding one column group. Scaling half of a real head's query features by -8
    # reshapes its attention and so moves every one of its output columns; a narrower head's change
    # stays in its own columns, the others keep their exact values. (Per-head output gates move only
    # their own columns, so one query block per head moving them all is enough.)
    halves = []
    for li in probed:
        for pi, (ln, m, block) in enumerate(structure[li][5]):
            for h, feats in plans[li].roles.get(ln, {}).get("q", {}).items():
                for start in range(0, len(feats), block):
                    chunk = feats[start:start + block]
                    halves.append((li, pi, h, chunk[:max(1, len(chunk) // 2)]))
    rows = 1 + len(halves)
    signs = {}
    for r, (li, pi, h, feats) in enumerate(halves, start=1):
        width = _out_width(structure[li][5][pi][1])
        signs.setdefault((li, pi), (torch.ones(rows, width), torch.ones(rows, width)))[0][r, feats] = -8
    captured = _signed_forward(model, arch, structure, probed, signs, rows)
    for li in probed:
        head_dim = structure[li][4]
        x = captured[li].float().view(rows, _T, n_heads, head_dim)
        whole = set()
        for r, (l, _, h, _) in enumerate(halves, start=1):
            moved = (x[r, :, h] - x[0, :, h]).abs().amax(dim=0)  # per output column
            if l == li and bool(moved.min() > 1e-3 * moved.max() > 0):
                whole.add(h)
        narrow = sorted(set(range(n_heads)) - whole)
        if narrow:
            raise HeadsNotFound(
                f"{arch}: layer {li}: the query features of heads {narrow} move only part of their {head_dim} output "
                f"columns, so the model computes more, narrower heads than the {n_heads} its config counts (a "
                f"per-layer head count); lit_heads needs the same heads in every layer.")
    return plans


def _signed_forward(model, arch, structure, probed, signs, rows) -> dict[int, torch.Tensor]:
    """One probe forward of `rows` rows with the projection outputs multiplied by `signs`; returns
    each probed layer's output-projection input [rows, _T, features]."""
    last = max(probed)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for li in probed:
        an, attn, o_name, o_proj, head_dim, projs = structure[li]
        for pi, (ln, m, _) in enumerate(projs):
            if (li, pi) in signs:
                hooks.append(m.register_forward_hook(_sign_hook(*signs[(li, pi)], rows, f"{an}.{ln}")))
        hooks.append(o_proj.register_forward_pre_hook(_capture_hook(captured, li, rows, li == last)))
    _run(model, _probe_ids(model, rows, _model_device(model)), hooks, arch)
    for li in probed:
        if li not in captured:
            an, _, o_name = structure[li][:3]
            raise HeadsNotFound(f"{arch}: layer {li}: the output projection `{an}.{o_name}` did not run in the probe.")
    return captured


def _raise_stop(module, args, output):
    raise _StopProbe


def _sign_hook(glob: torch.Tensor, loc: torch.Tensor, rows: int, name: str):
    """Multiplies the module's output [rows, tokens, features] by -1 where `glob` [rows, features]
    says so, at every token, and where `loc` says so, at every token but the last."""

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[:-1].numel() % rows:
            raise HeadsNotFound(f"probe: `{name}` returned {type(output).__name__} "
                                f"{tuple(getattr(output, 'shape', ()))}, not [rows, tokens, features].")
        out = output.reshape(rows, -1, output.shape[-1])
        if out.shape[1] < _T:
            raise HeadsNotFound(f"probe: `{name}` saw {out.shape[1]} tokens per row, fewer than the {_T} given.")
        sign = glob[:, None, :].repeat(1, out.shape[1], 1)
        sign[:, :-1] *= loc[:, None, :]
        return (out * sign.to(device=out.device, dtype=out.dtype)).view(output.shape)

    return hook


def _capture_hook(captured: dict, li: int, rows: int, stop: bool):
    def hook(module, args):
        x = args[0]
        if li not in captured:
            captured[li] = x.detach().reshape(rows, -1, x.shape[-1])[:, -_T:].clone()
        if stop:
            raise _StopProbe

    return hook


def _read_probe(arch, li, an, o_name, x, jobs, projs, n_heads, head_dim) -> _Plan:
    base = x[0]  # [T, H, hd]
    size = base.abs().amax(dim=(0, 2)).clamp_min(torch.finfo(torch.float32).tiny)  # per head
    where = f"{arch}: layer {li}"

    def effect(r):
        return (x[r] - base).abs().amax(dim=2) / size  # [T, H], relative to each head's size

    found: dict[tuple[int, int], dict[str, object]] = {}
    for r, (_, pi, b, kind) in jobs:
        found.setdefault((pi, b), {})[kind] = (r, effect(r))
    roles: dict[str, dict[str, dict[int, list[int]]]] = {}
    kv_blocks = []
    q_heads: set[int] = set()
    for (pi, b), res in sorted(found.items()):
        ln, m, block = projs[pi]
        r_glob, glob = res["global"]
        _, loc = res["local"]
        heads = frozenset(int(h) for h in (glob > _UNCHANGED).any(dim=0).nonzero().flatten())
        loc_heads = frozenset(int(h) for h in (loc > _UNCHANGED).any(dim=0).nonzero().flatten())
        feats = list(range(b * block, (b + 1) * block))
        label = f"{where}: features {feats[0]}..{feats[-1]} of `{an}.{ln}`"
        if not heads:
            raise HeadsNotFound(f"{label} change no head's output; find_heads cannot place them.", "unsupported")
        if not loc_heads <= heads:
            raise HeadsNotFound(
                f"{label} feed heads {sorted(heads)} when changed everywhere but also heads "
                f"{sorted(loc_heads - heads)} when changed at one position; not a per-head projection.")
        # Negated at every position but the last: query-side features leave the last position as it
        # was (it is computed from its own query alone); keys and values of earlier tokens reach it.
        later = bool((loc[-1] > _UNCHANGED).any())
        if not later:  # changes only the position it was changed at: query-side features
            if len(heads) != 1:
                raise HeadsNotFound(
                    f"{label} are query-side (they change only their own position) but change the outputs of heads "
                    f"{sorted(heads)}. Either several heads share these features (a low-rank query projection, as "
                    f"in multi-head latent attention) or the heads are mixed before the output projection (a norm "
                    f"across all heads, differential attention); either way the output projection's input is not "
                    f"a concatenation of independent heads, so neither exact AP nor per-head slices exist.",
                    "heads mixed")
            (h,) = heads
            roles.setdefault(ln, {}).setdefault("q", {}).setdefault(h, []).extend(feats)
            q_heads.add(h)
        else:
            sel = sorted(heads)
            negated = (x[r_glob][:, sel] + base[:, sel]).abs().amax(dim=(0, 2)) / size[sel]
            role = "v" if bool((negated <= _UNCHANGED).all()) else "k"
            kv_blocks.append((ln, role, heads, feats))
    # Values negate their heads' outputs exactly, whatever the attention weights are, so the value
    # blocks give the KV groups reliably; every key block must feed one of those groups.
    groups = sorted({heads for _, role, heads, _ in kv_blocks if role == "v"}, key=min)
    for a in groups:
        for b in groups:
            if a != b and a & b:
                raise HeadsNotFound(
                    f"{where}: value features of `{an}` feed the overlapping head sets {sorted(a)} and "
                    f"{sorted(b)}: values are shared across groups (e.g. a compressed KV projection, as in "
                    f"multi-head latent attention), so there are no per-group slices.", "heads mixed")
    for ln, role, heads, feats in kv_blocks:
        if role == "k" and heads not in groups:
            raise HeadsNotFound(
                f"{where}: key features {feats[0]}..{feats[-1]} of `{an}.{ln}` feed heads {sorted(heads)}, which is "
                f"not one of the KV groups the values form ({[sorted(g) for g in groups]}): keys are shared "
                f"differently from values (e.g. a compressed KV projection), so there are no per-group slices.",
                "heads mixed")
    all_heads = set(range(n_heads))
    covered = set().union(*groups) if groups else set()
    if q_heads != all_heads or covered != all_heads:
        raise HeadsNotFound(
            f"{where}: query features found for heads {sorted(q_heads)} and key/value features for heads "
            f"{sorted(covered)}, of {n_heads} heads; every head needs both (a layer that reuses the keys and "
            f"values of another layer has none of its own).")
    group_index = {g: i for i, g in enumerate(groups)}
    for ln, role, heads, feats in kv_blocks:
        roles.setdefault(ln, {}).setdefault(role, {}).setdefault(group_index[heads], []).extend(feats)
    for gi in range(len(groups)):
        for role in ("k", "v"):
            if not any(gi in per.get(role, {}) for per in roles.values()):
                what = "key" if role == "k" else "value"
                raise HeadsNotFound(f"{where}: KV group {sorted(groups[gi])} has no {what} "
                                    f"features (values are recognised by attention being linear in them).")
    return _Plan(an, o_name, head_dim, tuple(tuple(sorted(g)) for g in groups), roles)


# ------------------------------------------------------------------------------------------------
# find_heads

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, HeadLayout]]" = weakref.WeakKeyDictionary()


def find_heads(model: nn.Module) -> HeadLayout:
    """Locate the attention heads of a Hugging Face causal LM (the *ForCausalLM or its base model).

    Runs the model once on a few tokens (in eval mode, without gradients, stopping after the probed
    layers; train/eval modes, parameters and RNG streams are left as found) the first time it sees
    a model object. Raises `HeadsNotFound` (a `ModelError`) when the heads cannot be described
    exactly, saying what was found.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if config is None or arch is None:
        raise ModelError(
            f"find_heads needs a Hugging Face transformers model with a `.config.model_type`; got "
            f"{type(model).__name__}. Pass the *ForCausalLM (or its base model) loaded with transformers."
        )
    override = ARCHITECTURES.get(arch)
    if override is not None and override.refuse:
        raise HeadsNotFound(f"{arch}: {override.refuse}", "refused")
    # The same modules and parameters give the same layout (training changes values only).
    fingerprint = (tuple((id(m), type(m)) for m in model.modules()), tuple(id(p) for p in model.parameters()), override)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    text_config = _text_config(config)
    layer_list = _decoder_layers(model, text_config, override, arch)

    candidates: dict[int, list[tuple[str, nn.Module]]] = {}
    for li, layer in enumerate(layer_list):
        if override is not None and override.attention:
            try:
                candidates[li] = [(override.attention, _get_path(layer, override.attention))]
            except AttributeError:
                raise HeadsNotFound(
                    f"{arch}: layer {li} has no `{override.attention}` (ARCHITECTURES override).") from None
        else:
            candidates[li] = _attention_candidates(layer)
    without = [li for li, c in candidates.items() if not c]
    if len(without) == len(layer_list):
        raise HeadsNotFound(
            f"{arch} ({type(model).__name__}): none of its {len(layer_list)} {type(layer_list[0]).__name__} layers has "
            f"an attention module made of linear projections, so there are no attention heads to score or train "
            f"(a state-space or recurrent model, or attention written with bare weight tensors).", "no attention")
    if without:
        raise HeadsNotFound(
            f"{arch} ({type(model).__name__}): a hybrid model: layers {without} of {len(layer_list)} have no attention "
            f"module. lit_heads' patterns are layers x heads over every decoder layer, so hybrids are not supported.",
            "hybrid")

    n_heads = _config_int(text_config, *_HEAD_COUNT_NAMES)
    if n_heads is None:
        attn0 = candidates[0][0][1]
        n_heads = _config_int(attn0, *_HEAD_COUNT_NAMES)
    if n_heads is None:
        raise HeadsNotFound(
            f"{arch}: neither the config nor the attention-like module {type(candidates[0][0][1]).__name__} says how "
            f"many heads there are, so it is not multi-head attention (e.g. RWKV's time mixing).", "no heads")

    # Probe the first layer of each distinct attention structure; the others reuse its plan.
    first_of: dict[tuple, int] = {}
    sig_of = {}
    for li, cands in candidates.items():
        sig = tuple(_signature(m) for _, m in cands)
        sig_of[li] = sig
        first_of.setdefault(sig, li)
    probed = sorted(first_of.values())
    # No values to run on: meta parameters, or meta buffers under stand-in parameters (`lit_heads plan`).
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        plans = _probe_twin(model, arch, override, probed, candidates, n_heads)
    else:
        _check_probeable(model, arch)
        with eval_mode(model):
            plans = _probe(model, arch, probed, candidates, n_heads)

    head_dims = {p.head_dim for p in plans.values()}
    kv_counts = {len(p.groups) for p in plans.values()}

    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen_modules: set[int] = set()
    layers: list[LayerHeads] = []
    for li, layer in enumerate(layer_list):
        plan = plans[first_of[sig_of[li]]]
        attn = _get_path(layer, plan.attention)
        o_proj = _get_path(attn, plan.o_proj)
        mods = [o_proj] + [_get_path(attn, ln) for ln in plan.roles]
        if any(id(m) in seen_modules for m in mods):
            raise HeadsNotFound(f"{arch}: layer {li} reuses the attention projections of an earlier layer (shared "
                                f"weights), so its heads have no parameters of their own.")
        seen_modules.update(id(m) for m in mods)
        per_role: dict[str, list[_Proj]] = {"q": [], "k": [], "v": []}
        for ln, by_role in plan.roles.items():
            m = _get_path(attn, ln)
            name = module_names.get(id(m), f"layers.{li}.{plan.attention}.{ln}")
            for role, rows in by_role.items():
                by_index = {i: torch.tensor(sorted(r)) for i, r in rows.items()}
                per_role[role].append(_Proj(m, name, _out_dim(m), by_index))
        layers.append(LayerHeads(
            index=li, attention=attn, o_proj=o_proj,
            o_proj_name=module_names.get(id(o_proj), f"layers.{li}.{plan.attention}.{plan.o_proj}"),
            n_heads=n_heads, n_kv_heads=len(plan.groups), head_dim=plan.head_dim,
            _q=per_role["q"], _k=per_role["k"], _v=per_role["v"], _groups=plan.groups,
            _o_in_dim=1 - _out_dim(o_proj), _param_names=param_names,
        ))
    layout = HeadLayout(arch=arch, n_layers=len(layers), n_heads=n_heads,
                        n_kv_heads=kv_counts.pop() if len(kv_counts) == 1 else None,
                        head_dim=head_dims.pop() if len(head_dims) == 1 else None, layers=layers)
    _CACHE[model] = (fingerprint, layout)
    return layout
