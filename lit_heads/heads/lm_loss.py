"""The response-token loss of a causal LM, without [batch, seq, vocab] logits.

Every loss lit_heads computes (the SFT training loss, the validation/test `ResponseLoss`, the
per-sample loss of the activation pattern) is the float32 next-token cross-entropy of the labelled
tokens (shifted labels != -100), averaged over those tokens (or over each sample's tokens).
`token_losses` returns those per-token losses, in (sample, position) order; the callers only reduce.

The plain path (`chunk_size=0`) runs the whole model and takes the cross-entropy of its logits: it
holds batch x seq x vocab logits, their float32 copy and their gradient, which for a 262k-token
vocabulary (Gemma 3) are the largest tensors of a step. The chunked path (the default) runs the
model's decoder (`decoder_of`), gathers the hidden states of the labelled positions only and
applies the LM head, and what the model's forward does to its logits after the head, to `chunk_size`
positions at a time. Each chunk is checkpointed (`torch.utils.checkpoint`): backward recomputes its
logits instead of keeping them, so the loss never holds more than one chunk of logits (a batch whose
labelled positions fit in one chunk skips the checkpoint: it holds one chunk either way).

What a model does after its head (Gemma's final-logit softcapping, Cohere's logit scale, Granite's
logit scaling, ...) is read from its config, then checked once per model against the model's own
forward on a short random input: a model whose logits the chunked path does not reproduce is refused
with `HeadNotReproducible` (use the plain path for it), never scored with different logits.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_heads.errors import ConfigError
from lit_heads.heads.layout import eval_mode, unwrap_model

__all__ = ["DEFAULT_CHUNK_SIZE", "HeadNotReproducible", "IGNORE_INDEX", "check_chunked_loss", "logits_token_losses",
           "mean_loss", "sample_means", "token_losses"]

IGNORE_INDEX = -100
# Positions per chunk. A chunk's backward holds several chunk-sized float32 tensors at once (the
# recomputed logits, Gemma's softcap, log-softmax and their gradients), 1 GiB each at 1024 x 262,144
# (Gemma 3). On Gemma at batch 8 x 512, 256 positions instead of 1024 lowered a training step's peak
# from 13,790 to 12,027 MiB, and the head's matrix product still runs at full speed (README, Benchmarks).
DEFAULT_CHUNK_SIZE = 256


class HeadNotReproducible(ConfigError):
    """The chunked loss cannot reproduce the model's logits from its decoder and LM head."""


_USE_PLAIN = ("Use the plain loss (the model's full logits) for it: `model.loss_chunk_size: 0` in a fit config, "
              "`loss_chunk_size=0` for SFTModule and compute_ap in Python.")


def labelled(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] mask of the positions whose next token carries a label (HF causal LMs predict token
    t+1 from position t, so the label at position 0 is never scored)."""
    return labels[:, 1:] != IGNORE_INDEX


def logits_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path: cross-entropy of each labelled token from full [B, T, V] logits, float32, [N]."""
    targets = labels[:, 1:].flatten()
    # Flattened to [B*T, V]: the [B, V, T] layout (a transpose) takes a CPU kernel that loses about
    # 1e-3 relative precision on a 49k-token vocabulary; this one matches an fp64 reference to ~1e-5.
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses[targets != IGNORE_INDEX]


def mean_loss(losses: torch.Tensor) -> torch.Tensor:
    """The batch loss: mean over every labelled token of the batch (NaN for a batch without any, as
    cross-entropy's own mean gives)."""
    return losses.mean()


def sample_means(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean over its own labelled tokens, [B] float32 (NaN for a sample without any).
    `losses` are `token_losses` of the batch whose labels these are."""
    keep = labelled(labels)
    sample = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, sample, losses)
    return sums / keep.sum(dim=1).to(losses.dtype)


def token_losses(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                 chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Float32 next-token cross-entropy of every labelled token of the batch, [N], in (sample,
    position) order.

    inputs: the model's forward arguments (input_ids, attention_mask, position_ids, ...; no labels).
    chunk_size: labelled positions whose logits exist at once; 0 or None: the plain path (the model's
    full logits). Raises `HeadNotReproducible` where the chunked path cannot reproduce the logits.
    """
    if not chunk_size:
        return logits_token_losses(model(**inputs, use_cache=False).logits, labels)
    check_chunked_loss(model, chunk_size)
    model = hf_model(model)
    head = reproduced_head(model)
    hidden = decoder_of(model)(**inputs, use_cache=False)[0]
    keep = labelled(labels)
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    if rows.shape[0] == 0:  # still through the head, so the graph holds every parameter (zero gradients)
        return head.cross_entropy(rows, targets)
    chunks = [(rows[i:i + chunk_size], targets[i:i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)]
    # Without backward there is nothing to recompute. With one chunk, checkpointing would only move
    # the same chunk of logits from the end of the forward to the start of the backward, at the cost
    # of a second pass through the head (for Gemma 3, a [positions x 640] by [640 x 262,144] product).
    if not torch.is_grad_enabled() or len(chunks) == 1:
        return torch.cat([head.cross_entropy(r, t) for r, t in chunks])
    return torch.cat([checkpoint(head.cross_entropy, r, t, use_reentrant=False) for r, t in chunks])


def check_chunked_loss(model: nn.Module, chunk_size: int | None) -> None:
    """Raise now what `token_losses` would raise at its first batch (`HeadNotReproducible`, a bad
    chunk size), with the check's own forward passes outside any training step."""
    if chunk_size:
        if chunk_size < 0:
            raise ConfigError(f"loss_chunk_size must be a positive number of positions (or 0 for the plain path), "
                              f"got {chunk_size}.")
        reproduced_head(hf_model(model))


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module whose output the model's forward turns into logits: `base_model` (`model.model`,
    GPT-2's `transformer`), else `get_decoder()`, else a child named `model` (Llama 4, whose
    `base_model_prefix` names no attribute); None if there is none."""
    get = getattr(model, "get_decoder", None)
    for found in (getattr(model, "base_model", None), get() if callable(get) else None, getattr(model, "model", None)):
        if isinstance(found, nn.Module) and found is not model:
            return found
    return None


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP, torch.compile or PEFT wrappers (a PEFT model's own
    `base_model` is its tuner, not the decoder)."""
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)  # PeftModel
    return get_base() if callable(get_base) else model


# ------------------------------------------------------------------------------------------------
# the LM head and what the forward does after it


@dataclass(frozen=True)
class _Head:
    """What the model's forward does with the decoder's hidden states: its head modules (children of
    the model, by name: `lm_head`; BERT's `cls`; Electra's `generator_predictions`, `generator_lm_head`)
    applied in turn, then the elementwise transform of the logits (scales first, then the tanh softcap,
    as Gemma-style forwards do), cut to the model's vocabulary; hidden states divided by `hidden_divide`
    first where the forward does so (Inkling's muP width multiplier). By name, so that a module replaced
    later (a PEFT adapter on the LM head) is the one used."""

    names: tuple[str, ...]
    hidden_divide: float | None = None
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None
    vocab: int | None = None

    def bind(self, model: nn.Module) -> "_BoundHead":
        return _BoundHead(self, tuple(getattr(model, n) for n in self.names))

    def describe(self) -> str:
        parts = [f"{k} {v:g}" for k, v in (("hidden /", self.hidden_divide), ("x", self.multiply), ("/", self.divide),
                                            ("softcap", self.softcap)) if v is not None]
        return f"{' then '.join(self.names)}" + (f", {', '.join(parts)}" if parts else "")


@dataclass(frozen=True)
class _BoundHead:
    spec: _Head
    modules: tuple[nn.Module, ...]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.spec.hidden_divide is not None:
            hidden = hidden / self.spec.hidden_divide
        for module in self.modules:
            hidden = module(hidden)
        logits, spec = hidden, self.spec
        if spec.vocab is not None:
            logits = logits[..., :spec.vocab]
        if spec.multiply is not None:
            logits = logits * spec.multiply
        if spec.divide is not None:
            logits = logits / spec.divide
        if spec.softcap is not None:
            logits = torch.tanh(logits / spec.softcap) * spec.softcap
        return logits

    def cross_entropy(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(rows).float(), targets, reduction="none")


# Per model: the head found and checked on it (or the refusal). What the forward does after the
# decoder does not change; the modules may (PEFT adapters), so they are looked up by name each time.
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, _Head | HeadNotReproducible]" = weakref.WeakKeyDictionary()


def reproduced_head(model: nn.Module) -> _BoundHead:
    """The model's head with its logit transform, checked once against the model's own forward."""
    found = _CHECKED.get(model)
    if found is None:
        found = _check(model, _candidates(model))
        _CHECKED[model] = found
    if isinstance(found, HeadNotReproducible):
        raise found
    return found.bind(model)


def _candidates(model: nn.Module) -> list[_Head]:
    """The heads to try, most likely first: the child module that holds the output embeddings alone
    (`lm_head`, BERT's `cls`), then every child after the decoder in registration order (Electra)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    base = decoder_of(model)
    if out is None or base is None:
        raise HeadNotReproducible(
            f"{type(model).__name__} has no decoder (`base_model`, `get_decoder()`) and separate LM head (a child "
            f"module holding `get_output_embeddings()`), so the chunked loss cannot compute its logits from the "
            f"hidden states. "
            + _USE_PLAIN
        )
    children = [(n, c) for n, c in model.named_children() if c is not base]
    holding = [n for n, c in children if any(m is out for m in c.modules())]
    transform = _transform(model)
    names = [tuple(holding), tuple(n for n, _ in children)]
    return [_Head(n, **transform) for i, n in enumerate(names) if n and n not in names[:i]]


def _transform(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    product = 1.0
    # Cohere (logit_scale), Falcon-H1 (lm_head_multiplier), MuseSpark (output_multiplier): multiplied in.
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            product *= float(value)
    divide = getattr(text, "logits_scaling", None)  # Granite
    # Gemma 2, 3, ...; RecurrentGemma; xLSTM
    softcap = next((v for v in (getattr(text, n, None) for n in ("final_logit_softcapping", "logits_soft_cap",
                                                                "output_logit_soft_cap")) if v), None)
    vocab = getattr(text, "unpadded_vocab_size", None)
    width = getattr(text, "logits_mup_width_multiplier", None)  # Inkling
    return dict(
        hidden_divide=float(width) if isinstance(width, (int, float)) and width != 1 else None,
        multiply=product if product != 1.0 else None,
        divide=float(divide) if isinstance(divide, (int, float)) and divide != 1 else None,
        softcap=float(softcap) if softcap else None,
        vocab=int(vocab) if vocab else None,
    )


def _check(model: nn.Module, candidates: list[_Head]) -> _Head | HeadNotReproducible:
    """The first candidate whose logits from the decoder's hidden states are the model's own, on one
    short random sequence (eval mode, no grad). Differences of rounding pass; a missing softcap,
    scale, bias or layer does not (it changes the logits by far more)."""
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings
    device = emb.weight.device
    ids = torch.randint(min(4, vocab - 1), vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = type(model).__name__
    tried = []
    with eval_mode(model), torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        hidden = decoder_of(model)(**inputs, use_cache=False)[0]
        eps = torch.finfo(_precision(model, expected)).eps
        scale = float(expected.double().abs().amax())
        for head in candidates:
            try:
                got = head.bind(model).logits(hidden)
                shape = tuple(got.shape)
            except Exception as err:  # a head that does not take the decoder's output as it is
                tried.append(f"{head.describe()}: {type(err).__name__}: {err}")
                continue
            if shape != tuple(expected.shape):
                tried.append(f"{head.describe()}: shape {shape}, the model's {tuple(expected.shape)}")
                continue
            diff = float((got.double() - expected.double()).abs().amax())
            if diff <= 4 * eps * max(scale, 1e-30):  # NaN fails too
                return head
            tried.append(f"{head.describe()}: logits off by {diff:.3g} (largest {scale:.3g})")
    return HeadNotReproducible(
        f"{name}: its forward does something between the decoder's hidden states and the logits that lit_heads "
        f"cannot reproduce, so the chunked loss cannot compute its logits. Tried: {'; '.join(tried)}. " + _USE_PLAIN
    )


def _precision(model: nn.Module, logits: torch.Tensor) -> torch.dtype:
    # The logits come in the head's compute dtype (autocast's, under mixed precision); a half
    # precision anywhere on the way bounds the agreement to be expected.
    weight = model.get_input_embeddings().weight
    dtypes = [logits.dtype, weight.dtype] + ([torch.get_autocast_dtype(weight.device.type)]
                                             if torch.is_autocast_enabled(weight.device.type) else [])
    return max(dtypes, key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
