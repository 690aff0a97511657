"""Will it fit? Exact trainable counts and a per-device memory estimate for SFT arms, before any GPU.

The model is built from its config alone, on the meta device (`AutoModelForCausalLM.from_config`
under `torch.device("meta")`): no weights are read, nothing is downloaded, a .gguf file contributes
only its metadata. Trainable counts come from the same code a fit runs: the full arm trains every
parameter (the number `SFTModule.on_fit_start` prints); a head arm is counted by applying the real
`HeadRestriction` (whose `describe()` is what `HeadRestrictedFinetuning` prints).

The memory estimate per device is the sum of the parts below; `MEMORY_MODEL` states every assumption
and the README's "Will it fit?" section repeats it. Activation bytes follow `activation_bytes_per_token`,
a count of the tensors autograd keeps for a Llama-style decoder (RMSNorm, SDPA/flash attention,
gated MLP), checked against the tensors a real forward pass saves in tests/test_plan.py.

No Lightning here: the `lit_heads plan` command (lit_heads/commands/plan.py) parses and prints.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_heads.errors import ConfigError, ModelError

PRECISIONS = ("32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
# What each strategy splits over the world size (devices x nodes); the rest is replicated.
SHARDED = {
    "single_device": frozenset(),
    "ddp": frozenset(),
    "deepspeed_stage_1": frozenset({"optimizer"}),
    "deepspeed_stage_2": frozenset({"optimizer", "gradients"}),
    "deepspeed_stage_3": frozenset({"optimizer", "gradients", "weights"}),
    "fsdp": frozenset({"optimizer", "gradients", "weights"}),
}
STRATEGIES = ("auto", *SHARDED)  # auto: single_device for one device, else ddp (as Lightning's "auto")
# Strategies that leave the model as it is: *-mixed runs under autocast with an fp32 residual stream.
_AUTOCAST = ("single_device", "ddp")
# Optimizer: (state tensors per trained scalar, full-size temporaries of one step). torch's AdamW
# (foreach, the default on CUDA) makes one temporary of the trained size (the sqrt of its second moment).
OPTIMIZERS = {"adamw": (2, 1), "adam": (2, 1), "sgd_momentum": (1, 0), "sgd": (0, 0)}
# Logits per token: fp32 log-probabilities kept for backward, their fp32 gradient, and the fp32
# gradient of the logits, alive together at the start of backward (see `response_loss`).
LOGIT_BYTES = 12

MEMORY_MODEL = """\
Assumptions (per device; README "Will it fit?" has the reasoning):
- weights: every parameter, plus the trained deltas of a head arm; 32-true and *-mixed hold fp32
  (the mixed-precision master weights), *-true half precisions hold 2 bytes; DeepSpeed with a half
  precision holds the module in 2 bytes and an fp32 master copy of the trained scalars in its optimizer.
- sharding over world size = devices x nodes: fsdp and deepspeed_stage_3 split weights, gradients and
  optimizer state; deepspeed_stage_2 gradients and optimizer state; deepspeed_stage_1 optimizer state;
  ddp and single_device split nothing. Activations are never split (data parallel).
- gradients: one per trained scalar, in the weights' dtype; under fsdp a unit (decoder layer) holding
  any trained tensor gets a gradient for all of its parameters (FSDP's use_orig_params=True rule), and
  ddp keeps a second copy in its buckets (gradient_as_bucket_view=False, Lightning's default).
- weight copies alive during forward/backward: ddp/single_device + *-mixed: the autocast copy of every
  nn.Linear weight; fsdp / deepspeed_stage_3: the all-gathered parameters outside the decoder layers
  plus two decoder layers (current + prefetched), which assumes FSDP wraps each decoder layer
  (auto_wrap_policy); head arms: each restricted weight materialised as W + delta for backward.
- activations: a Llama-style decoder with SDPA/flash attention (no seq x seq matrix) at micro-batch x
  max_length tokens, every layer counted as trained (an upper bound for head arms), one layer's worth
  more for the backward working set (with gradient checkpointing: the layer being recomputed), and the
  logits at 12 bytes per token and vocabulary entry.
- peak = weights + gradients + optimizer state + max(weight copies + activations, optimizer step
  temporaries); gradients and activations are added although backward frees one as it fills the other.
- not counted: CUDA context and allocator fragmentation (keep ~10% headroom), validation generation,
  DeepSpeed's communication buckets."""


# ------------------------------------------------------------------------------------------------
# Input checks that need no model


def parse_memory(text: str | int | float) -> int:
    """Bytes from '80GB', '80 GiB', '141GB', '24576MiB', or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise ConfigError(
                f"--memory {text!r} is not a memory size. Write it as a number with a unit, e.g. 80GB (10^9 bytes), "
                "80GiB (2^30 bytes) or 24576MiB."
            )
        value, unit = float(match.group(1)), (match.group(2) or "b").lower()
    scale = {"b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
             "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    if unit not in scale or value <= 0:
        raise ConfigError(f"--memory {text!r} must be a positive size such as 80GB or 80GiB.")
    return int(value * scale[unit])


def check_options(strategy: str, precision: str, optimizer: str, devices: int, num_nodes: int,
                  batch_size: int, max_length: int, kv: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"Unknown strategy {strategy!r}. Use one of {', '.join(STRATEGIES)}: auto is single_device on one "
            "device and ddp on more, ddp replicates everything, "
            "deepspeed_stage_1/2/3 shard optimizer state / + gradients / + weights over the devices, fsdp shards "
            "all three (like stage 3)."
        )
    if precision not in PRECISIONS:
        raise ConfigError(
            f"Unknown precision {precision!r}. Use one of {', '.join(PRECISIONS)} (Lightning's names: *-true "
            "computes and stores in that dtype, *-mixed stores fp32 and computes in the half precision)."
        )
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"Unknown optimizer {optimizer!r}. Use one of {', '.join(OPTIMIZERS)} "
            "(AdamW keeps 2 states per trained scalar)."
        )
    if kv not in ("group", "none"):
        raise ConfigError(
            f"Unknown kv policy {kv!r}. Use 'group' (train the K/V rows of every KV group holding a selected head) "
            "or 'none' (keys and values stay frozen), as in HeadRestrictedFinetuning."
        )
    for name, value in (("devices", devices), ("num_nodes", num_nodes), ("batch_size", batch_size),
                        ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}.")


# ------------------------------------------------------------------------------------------------
# The model, from its config only

_SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")


def load_config(name: str):
    """(transformers config, description) from a bundled short name, a .gguf file (metadata only), a
    Hugging Face directory, a bare config.json, or a `lit_heads fit` checkpoint (its base model)."""
    from transformers import AutoConfig

    from lit_heads.models import bundled_gguf, checkpoint_base_model, is_bundled

    text = str(name)
    path = Path(text).expanduser()
    if is_bundled(text):
        path = bundled_gguf(text)
    if path.suffix == ".ckpt":
        return load_config(checkpoint_base_model(path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist. Give the path of an existing .gguf file.")
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as err:  # the gguf reader raises several types for files it cannot map
            raise ModelError(f"Could not read the metadata of {path} as a model config: {err}") from err
        return config, f"{path.name} (GGUF metadata only)"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"Directory {path} has no config.json, so it is not a Hugging Face model directory.")
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return _config_from_json(path), str(name)
    raise ModelError(
        f"`lit_heads plan` cannot read a model shape from {text!r}: it reads configs without downloading "
        "anything. Give a bundled short name ('smollm2-135m'), a Hugging Face directory with config.json, a "
        ".gguf file, a config.json file (configs/models/ holds Llama-2-7B, Llama-3-8B, Mistral-7B and "
        "Qwen2.5-7B) or a lit_heads .ckpt; for a hub model, fetch its config.json (a few KB) and pass that."
    )


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not a readable JSON config: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ModelError(
            f"{path} has no 'model_type', so the architecture is unknown. A Hugging Face config.json names it "
            "(e.g. \"model_type\": \"llama\")."
        )
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"{path}: transformers cannot build a config for model_type {raw['model_type']!r}: {err}"
        ) from err
    # transformers fills absent sizes with its defaults (e.g. 32 KV heads), which would plan another model.
    aliases = getattr(config, "attribute_map", {}) or {}
    missing = [key for key in _SIZE_KEYS if hasattr(config, key) and key not in raw and aliases.get(key) not in raw]
    if missing:
        raise ModelError(
            f"{path} does not give {', '.join(missing)}. transformers would fill in its defaults for a "
            f"{raw['model_type']} model, and the plan would be for another model. Add them from the model's "
            "published config.json (num_key_value_heads equals num_attention_heads for a model without "
            "grouped-query attention)."
        )
    return config


def meta_model(config) -> nn.Module:
    """The causal LM built on the meta device: shapes and structure, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        raise ModelError(f"transformers cannot build a causal LM for model_type {config.model_type!r}: {err}") from err


@dataclass(frozen=True)
class Dims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool


@dataclass
class ModelFacts:
    """Numbers of the meta model that the memory estimate needs."""

    arch: str
    class_name: str
    total: int  # every parameter once (tied weights once), what fit prints
    dims: Dims
    layer_class: str
    layer_params: list[int]  # per decoder layer
    outside_layers: int  # parameters not in a decoder layer (embeddings, final norm, lm_head)
    linear_weights: int  # nn.Linear weights (autocast casts these)
    layer_linear_weights: int  # the largest decoder layer's nn.Linear weights
    lm_head: int
    layer_prefixes: list[str] = field(repr=False)


def model_facts(model: nn.Module) -> ModelFacts:
    from lit_heads.heads import find_heads

    config = model.config
    layers, prefix = _decoder_layers(model, config.num_hidden_layers)
    total = sum(p.numel() for p in model.parameters())
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    layer_linear = max(sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)) for layer in layers)
    try:
        layout = find_heads(model)
        n_heads, n_kv, head_dim = layout.n_heads, layout.n_kv_heads, layout.head_dim
    except ModelError:  # an architecture head arms cannot train; the full arm still plans
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "ffn_dim", None) or 4 * config.hidden_size)
    gated = any(name.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj") for name, _ in model.named_modules())
    dims = Dims(len(layers), config.hidden_size, n_heads, n_kv, head_dim, intermediate, config.vocab_size, gated)
    head = model.get_output_embeddings()
    return ModelFacts(
        arch=config.model_type, class_name=type(model).__name__, total=total, dims=dims,
        layer_class=type(layers[0]).__name__, layer_params=layer_params, outside_layers=total - sum(layer_params),
        linear_weights=sum(linear.values()), layer_linear_weights=layer_linear,
        lm_head=head.weight.numel() if head is not None else 0,
        layer_prefixes=[f"{prefix}.{i}." for i in range(len(layers))],
    )


def _decoder_layers(model: nn.Module, n_layers: int) -> tuple[nn.ModuleList, str]:
    """The ModuleList of decoder layers: the one of length num_hidden_layers holding the most parameters."""
    found = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not found:
        raise ModelError(f"{type(model).__name__} has no list of {n_layers} decoder layers; cannot plan it.")
    _, name, layers = max(found, key=lambda f: f[0])
    return layers, name


# ------------------------------------------------------------------------------------------------
# Trainable counts per arm


@dataclass
class ArmCount:
    """What an arm trains. Head arms whose heads are chosen from data (top/bottom without scores) under
    kv=group give the range over placements: `low` packs the heads into as few KV groups as possible,
    `high` spreads them over as many KV groups (and layers) as possible; memory uses `high`."""

    spec: str
    low: int
    high: int
    n_heads: int | None = None  # selected heads (None: full arm)
    by_kind: dict = field(default_factory=dict)  # of the `high` placement
    kv_groups: tuple[int, int] = (0, 0)
    layers_touched: int = 0  # decoder layers holding a trained tensor (high placement)
    restricted_weights: list[int] = field(default_factory=list)  # per touched layer: numel of weights with a delta
    selection: str = ""  # how the heads are known

    @property
    def exact(self) -> bool:
        return self.low == self.high

    @property
    def full(self) -> bool:
        return self.n_heads is None


def count_arms(model: nn.Module | None, facts: ModelFacts, arms, kv: str, scores: str | None = None,
               seed: int = 0) -> list[ArmCount]:
    """Trainable counts of every arm. `arms` are parsed arms (`lit_heads.commands.compare.parse_arm`:
    `.spec`, `.strategy`, `.top_k`, `.fraction`, `.heads`). Heads are selected first for every arm, so a
    bad size or head file fails before any restriction is applied. Counting a head arm may replace the
    meta model's parameters with hollow ones (`_hollow`); `facts` must be taken before."""
    from lit_heads.heads import find_heads

    selections = {}
    layout = None
    for arm in arms:
        if arm.strategy is None:
            continue
        layout = layout or find_heads(model)
        selections[arm.spec] = _placements(arm, layout, scores, seed)
    target = None
    if selections:
        readable = layout.layers[0].query_slices(0)[0].index.device.type != "meta"
        target = model if readable else _hollow(model)
    out = []
    for arm in arms:
        if arm.strategy is None:
            out.append(ArmCount(arm.spec, facts.total, facts.total, layers_touched=facts.dims.n_layers,
                                selection="every parameter"))
            continue
        placements, how = selections[arm.spec]
        counted = [_restricted(target, facts, heads, kv) for heads in placements]
        low, high = min(counted, key=lambda c: c["trainable"]), max(counted, key=lambda c: c["trainable"])
        # kv=none with unknown heads: every placement trains the same count; memory takes the widest spread.
        widest = max(counted, key=lambda c: (c["trainable"], len(c["restricted_weights"])))
        out.append(ArmCount(
            arm.spec, low["trainable"], high["trainable"], n_heads=len(placements[0]), by_kind=widest["by_kind"],
            kv_groups=(low["kv_groups"], high["kv_groups"]), layers_touched=len(widest["restricted_weights"]),
            restricted_weights=widest["restricted_weights"], selection=how,
        ))
    return out


def _placements(arm, layout, scores: str | None, seed: int) -> tuple[list[list[tuple[int, int]]], str]:
    """The head selections to count: the one a fit would make when it does not depend on data, else the
    two extreme placements of the same number of heads."""
    from lit_heads.heads.pattern import Pattern
    from lit_heads.heads.selection import load_head_list, select_heads

    n_layers, n_heads = layout.n_layers, layout.n_heads
    if arm.strategy == "list":
        return [select_heads("list", n_layers, n_heads, heads=load_head_list(arm.heads))], f"listed in {arm.heads}"
    size = {"top_k": arm.top_k, "fraction": arm.fraction}
    if arm.strategy == "random":
        return [select_heads("random", n_layers, n_heads, **size, seed=seed)], f"seeded (seed {seed}), as fit selects"
    if scores is not None:
        path = Path(scores)
        pattern = Pattern.from_npy(path) if path.suffix.lower() == ".npy" else Pattern.load(path)
        ranked = pattern.check_shape(n_layers, n_heads).scores
        return [select_heads(arm.strategy, n_layers, n_heads, **size, scores=ranked)], f"ranked by {scores}"
    # A top/bottom arm selects as many heads as a random one of the same size (same rule, same checks).
    k = len(select_heads("random", n_layers, n_heads, **size, seed=0))
    per_group = layout.heads_per_group
    packed = [(i // n_heads, i % n_heads) for i in range(k)]
    # One head per KV group before a second head of any group, and every layer before a second group.
    order = [(layer, group * per_group + j) for j in range(per_group) for group in range(layout.n_kv_heads)
             for layer in range(n_layers)]
    return [sorted(packed), sorted(order[:k])], "chosen from data at fit start (no --scores)"


def _hollow(model: nn.Module) -> nn.Module:
    """The meta model with every parameter replaced by a zero-stride CPU tensor (one element of storage).

    HeadRestriction reads head indices from the layout, which (today) moves them to the parameters'
    device, and a meta tensor has no values to read; a hollow tensor has them at no memory cost. Only the
    deltas `HeadRestriction.apply()` creates take memory (2 bytes per trained scalar, while counting), and
    its shape check runs one index_add per restricted weight (seconds for an 8B model). Once the layout
    keeps indices readable on the meta device, `count_arms` restricts the meta model itself."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in replaced:
                hollow = torch.zeros((), dtype=torch.bfloat16).expand(param.shape)
                replaced[id(param)] = nn.Parameter(hollow, requires_grad=param.requires_grad)
            setattr(module, name, replaced[id(param)])
    return model


def _restricted(model: nn.Module, facts: ModelFacts, heads, kv: str) -> dict:
    from lit_heads.heads.restrict import HeadRestriction

    restriction = HeadRestriction(model, heads, kv=kv).apply()
    try:
        described = restriction.describe()
        names = [name for name, _ in restriction.named_trainable_parameters()]
    finally:
        restriction.remove()
    sizes = dict(model.named_parameters())
    per_layer = [sum(sizes[n].numel() for n in names if n.startswith(prefix)) for prefix in facts.layer_prefixes]
    return {"trainable": described["trainable"], "by_kind": described["by_kind"], "kv_groups": described["kv_groups"],
            "restricted_weights": [n for n in per_layer if n]}


# ------------------------------------------------------------------------------------------------
# Memory


def activation_bytes_per_token(dims: Dims, precision: str, strategy: str, full: bool, kv: str,
                               checkpointing: bool = False) -> dict:
    """Bytes autograd keeps per token, counted tensor by tensor for a Llama-style decoder:

    - RMSNorm (2 per layer, 1 after the last): its fp32 input (4h) and 1/rms (4); with a trained norm
      weight also the normalised input (r*h, r = bytes of the residual stream).
    - attention: q and the SDPA output (H*d each), k and v (Hkv*d each) in the compute dtype, the fp32
      log-sum-exp (4H), and the projections' input (h): once when q/k/v read one tensor, three times
      under ddp/single_device + *-mixed, where autocast casts the fp32 input for each projection separately.
    - gated MLP: gate and up outputs, the activation's output (3i); with a trained MLP its product (i)
      and input (h; twice under autocast).
    - outside the layers (`rest`): the final norm, the lm_head input when lm_head trains (h), the int64
      labels (8) and, when the embedding trains, the int64 input ids (8). In a head arm the first norm
      sees an input that needs no gradient (the embedding is frozen) and keeps nothing.
    - with gradient checkpointing a layer keeps only its input (r*h).

    Returns `layer` (one layer, as computed in forward and again when recomputed), `stored_layer` (what
    each layer keeps until backward), `rest`, and `logits`: the peak of the logits (`LOGIT_BYTES` x
    vocabulary), of which the fp32 log-probabilities (4 x vocabulary) are kept from forward to backward.

    A head arm (`full=False`) trains no norm, MLP, embedding or lm_head weight; every layer is counted as
    holding a trained head (an upper bound). Under DeepSpeed or FSDP a *-mixed model computes in half
    precision throughout (DeepSpeed casts the module, FSDP gathers half-precision weights), as a *-true one.
    tests/test_plan.py holds these counts to the tensors a real forward pass saves.
    """
    h, heads, kv_heads, d, i = dims.hidden, dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.intermediate
    c = 4 if precision == "32-true" else 2
    autocast = precision.endswith("-mixed") and strategy in _AUTOCAST
    r = 4 if precision == "32-true" or autocast else 2
    norm = 4 * h + 4 + (r * h if full else 0)
    qkv_inputs = 3 if autocast and (full or kv == "group") else 1
    attention = c * (2 * heads * d + 2 * kv_heads * d) + 4 * heads + c * h * qkv_inputs
    if dims.gated_mlp:
        mlp = c * i * (4 if full else 3) + (c * h * (2 if autocast else 1) if full else 0)
    else:  # fc1 -> activation -> fc2: the activation's input, and with a trained MLP fc2's and fc1's inputs
        mlp = c * i * (2 if full else 1) + (c * h if full else 0)
    layer = 2 * norm + attention + mlp
    rest = norm + 8 + (c * h + 8 if full else 0) - (4 * h + 4 if not full and not checkpointing else 0)
    return {"layer": layer, "stored_layer": r * h if checkpointing else layer, "rest": rest,
            "logits": LOGIT_BYTES * dims.vocab}


@dataclass
class Part:
    name: str
    bytes: int
    how: str


@dataclass
class ArmPlan:
    count: ArmCount
    parts: list[Part]
    peak: int
    memory: int

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory


@dataclass
class RunShape:
    strategy: str = "ddp"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "bf16-mixed"
    batch_size: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    kv: str = "group"

    def __post_init__(self):
        if self.strategy == "auto":
            self.strategy = "single_device" if self.world == 1 else "ddp"

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes


def plan_arm(facts: ModelFacts, count: ArmCount, run: RunShape, memory: int) -> ArmPlan:
    """The per-device parts and peak of one arm (see MEMORY_MODEL)."""
    sharded, world = SHARDED[run.strategy], run.world
    half = run.precision != "32-true"
    deepspeed = run.strategy.startswith("deepspeed")
    states, temporaries = OPTIMIZERS[run.optimizer]
    if deepspeed and half:  # ZeRO's mixed-precision layout: 2-byte module and gradients, fp32 master + states
        b_weight, b_grad, b_optim, b_step = 2, 2, 4 + 4 * states, 4 * temporaries
    else:
        b_weight = 2 if run.precision.endswith("-true") and half else 4
        b_grad, b_optim, b_step = b_weight, b_weight * states, b_weight * temporaries
    compute = 2 if half else 4
    trained = count.high
    layers = facts.dims.n_layers

    def share(n: int, part: str) -> tuple[int, str]:
        if part in sharded and world > 1:
            return math.ceil(n / world), f", sharded over {world}"
        return n, ""

    def dtype(b: int) -> str:
        return {2: "bf16" if "bf16" in run.precision else "fp16", 4: "fp32"}[b]

    parts = []
    deltas = 0 if count.full else trained
    n, split = share(facts.total + deltas, "weights")
    extra = f" + {deltas:,} deltas" if deltas else ""
    parts.append(Part("weights", n * b_weight, f"{facts.total:,}{extra} x {b_weight} B ({dtype(b_weight)}){split}"))

    if run.strategy == "fsdp" and not count.full:
        touched = sorted(facts.layer_params, reverse=True)[: count.layers_touched]
        n, split = share(sum(touched) + trained, "gradients")
        how = f"whole FSDP units: {count.layers_touched} decoder layers {sum(touched):,} + deltas {trained:,}"
    else:
        n, split = share(trained, "gradients")
        how = f"{trained:,}"
    parts.append(Part("gradients", n * b_grad, f"{how} x {b_grad} B{split}"))
    if run.strategy == "ddp":
        parts.append(Part("ddp buckets", trained * b_grad, f"a copy of the gradients, {trained:,} x {b_grad} B"))
    n, split = share(trained, "optimizer")
    kept = f"(fp32 master + {states} states) x 4 B" if deepspeed and half else f"{states} states x {b_weight} B"
    parts.append(Part("optimizer state", n * b_optim, f"{trained:,} x {kept}{split}"))

    copies, how = _weight_copies(facts, count, run, compute)
    parts.append(Part("weight copies", copies, how))

    per = activation_bytes_per_token(facts.dims, run.precision, run.strategy, count.full, run.kv,
                                     run.gradient_checkpointing)
    tokens = run.batch_size * run.max_length
    if run.gradient_checkpointing:
        how = f"{layers} layer inputs x {per['stored_layer']:,} B + 1 recomputed layer {per['layer']:,} B"
    else:
        how = f"{layers + 1} layers (1 for backward) x {per['layer']:,} B"
    per_token = layers * per["stored_layer"] + per["layer"] + per["rest"] + per["logits"]
    parts.append(Part("activations", tokens * per_token,
                      f"{tokens:,} tokens x ({how} + {per['rest']:,} B outside the layers "
                      f"+ logits {per['logits']:,} B)"))
    n, split = share(trained, "optimizer")
    parts.append(Part("optimizer step", n * b_step, f"temporaries of one step, {trained:,} x {b_step} B{split}; "
                                                    "not at the same time as activations"))
    size = {p.name: p.bytes for p in parts}
    persistent = size["weights"] + size["gradients"] + size.get("ddp buckets", 0) + size["optimizer state"]
    peak = persistent + max(size["weight copies"] + size["activations"], size["optimizer step"])
    return ArmPlan(count, parts, peak, memory)


def _weight_copies(facts: ModelFacts, count: ArmCount, run: RunShape, compute: int) -> tuple[int, str]:
    mixed = run.precision.endswith("-mixed")
    ckpt = run.gradient_checkpointing
    total, notes = 0, []
    if run.strategy in _AUTOCAST and mixed:
        # The autocast cache holds casts of trained leaf weights through the forward; autograd keeps the
        # casts of every linear whose input needs a gradient until its backward (one layer when checkpointed).
        n = facts.linear_weights if count.full or not ckpt else facts.lm_head + facts.layer_linear_weights
        total += 2 * n
        notes.append(f"autocast copies of {n:,} linear weights x 2 B")
    elif run.strategy in ("fsdp", "deepspeed_stage_3"):
        layer = max(facts.layer_params)
        n = facts.outside_layers + 2 * layer
        total += compute * n
        notes.append(f"all-gathered {facts.outside_layers:,} outside the layers + 2 x {layer:,} "
                     f"({facts.layer_class}) x {compute} B")
    if count.restricted_weights and not (run.strategy in _AUTOCAST and mixed):
        n = max(count.restricted_weights) if ckpt else sum(count.restricted_weights)
        total += compute * n
        notes.append(f"W + delta of {n:,} restricted weights x {compute} B")
    return total, "; ".join(notes) or "none"


# ------------------------------------------------------------------------------------------------
# Printing


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_memory(memory: int, text: str) -> str:
    return f"{text} ({gib(memory)})"


def format_arm(plan: ArmPlan, facts: ModelFacts, memory_text: str) -> str:
    c = plan.count
    share = f"{100 * c.high / facts.total:.3f}%"
    if c.full:
        head = f"arm {c.spec}: trains all {c.high:,} parameters ({share}), exact"
    else:
        kinds = ", ".join(f"{k} {n:,}" for k, n in c.by_kind.items() if n)
        if c.exact:
            count = f"{c.high:,} ({share}), exact"
        else:
            count = (f"{c.low:,} to {c.high:,} ({share} at most): depends on which heads the data picks, "
                     f"{c.kv_groups[0]} to {c.kv_groups[1]} KV groups (kv=group); give --scores for the exact count")
        head = (f"arm {c.spec}: {c.n_heads} of {facts.dims.n_layers * facts.dims.n_heads} heads, {c.selection}; "
                f"trains {count}\n  ({kinds}; memory below for heads spread over {c.layers_touched} layers)")
    rows = ["| part | per device | how |", "|---|---:|---|"]
    rows += [f"| {p.name} | {gib(p.bytes)} | {p.how} |" for p in plan.parts]
    margin = plan.memory - plan.peak
    verdict = (f"fits in {memory_text}: headroom {gib(margin)} ({100 * margin / plan.memory:.0f}%)" if plan.fits
               else f"does NOT fit in {memory_text}: {gib(-margin)} short")
    rows.append(f"| **peak** | **{gib(plan.peak)}** | {verdict} |")
    return head + "\n\n" + "\n".join(rows)
