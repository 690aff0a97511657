"""The response-token loss of a causal LM, without [batch, seq, vocab] logits.

Every loss lit_heads computes (the SFT training loss, the validation/test `ResponseLoss`, the
per-sample loss of the activation pattern) is the float32 next-token cross-entropy of the labelled
tokens (shifted labels != -100), averaged over those tokens (or over each sample's tokens).
`token_losses` returns those per-token losses, in (sample, position) order; the callers only reduce.

The plain path (`chunk_size=0`) runs the whole model and takes the cross-entropy of its logits: it
holds batch x seq x vocab logits, their float32 copy and their gradient, which for a 262k-token
vocabulary (Gemma 3) are the largest tensors of a step. The chunked path (the default) runs the
model's decoder (`model.base_model`), gathers the hidden states of the labelled positions only and
applies the LM head, and what the model's forward does to its logits after the head, to `chunk_size`
positions at a time. Each chunk is checkpointed (`torch.utils.checkpoint`): backward recomputes its
logits instead of keeping them, so the loss never holds more than one chunk of logits.

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
# Positions per chunk: 1024 x 262,144 (Gemma 3) float32 logits are 1 GiB; fewer positions would
# leave the head's matrix products too small to run at full speed.
DEFAULT_CHUNK_SIZE = 1024


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
    hidden = model.base_model(**inputs, use_cache=False)[0]
    keep = labelled(labels)
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    if rows.shape[0] == 0:  # still through the head, so the graph holds every parameter (zero gradients)
        return head.cross_entropy(rows, targets)
    chunks = [(rows[i:i + chunk_size], targets[i:i + chunk_size]) for i in range(0, rows.shape[0], chunk_size)]
    if not torch.is_grad_enabled():  # no backward, nothing to recompute
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
    """The model's LM head and the elementwise transform its forward applies to the logits (scales
    first, then the tanh softcap, as Gemma-style forwards do), cut to the model's vocabulary."""

    module: nn.Module
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None
    vocab: int | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.vocab is not None:
            logits = logits[..., :self.vocab]
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def cross_entropy(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(rows).float(), targets, reduction="none")


# Per model: the transform found and checked on it. The model's modules change (PEFT adapters,
# parametrizations) but not what its forward does after the head, so the module is looked up anew.
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, _Head | HeadNotReproducible]" = weakref.WeakKeyDictionary()


def reproduced_head(model: nn.Module) -> _Head:
    """The model's head with its logit transform, checked once against the model's own forward."""
    found = _CHECKED.get(model)
    if found is None:
        found = _check(model, _head_of(model))
        _CHECKED[model] = found
    if isinstance(found, HeadNotReproducible):
        raise found
    return _Head(_output_embeddings(model), found.multiply, found.divide, found.softcap, found.vocab)


def _output_embeddings(model: nn.Module) -> nn.Module:
    """The model's child module that holds its output embeddings: the LM head itself (`lm_head`), or
    a head with layers before the projection (BERT's `cls`: dense, activation, norm, decoder)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    base = getattr(model, "base_model", model)
    if out is not None and base is not model:
        for child in model.children():
            if child is not base and any(m is out for m in child.modules()):
                return child
    raise HeadNotReproducible(
        f"{type(model).__name__} has no decoder (`base_model`) and separate LM head (a child module holding "
        f"`get_output_embeddings()`), so the chunked loss cannot compute its logits from the hidden states. "
        + _USE_PLAIN
    )


def _head_of(model: nn.Module) -> _Head:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    product = 1.0
    # Cohere (logit_scale), Falcon-H1 (lm_head_multiplier), MuseSpark (output_multiplier): multiplied in.
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            product *= float(value)
    divide = getattr(text, "logits_scaling", None)  # Granite
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma 2, 3, ...
    vocab = getattr(text, "unpadded_vocab_size", None)
    return _Head(
        _output_embeddings(model),
        multiply=product if product != 1.0 else None,
        divide=float(divide) if isinstance(divide, (int, float)) and divide != 1 else None,
        softcap=float(softcap) if softcap else None,
        vocab=int(vocab) if vocab else None,
    )


def _check(model: nn.Module, head: _Head) -> _Head | HeadNotReproducible:
    """Whether the head applied to the decoder's hidden states gives the model's own logits, on one
    short random sequence (eval mode, no grad). Differences of rounding pass; a missing softcap,
    scale or bias does not (it changes the logits by far more)."""
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings
    device = emb.weight.device
    ids = torch.randint(min(4, vocab - 1), vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = type(model).__name__
    with eval_mode(model), torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        try:
            got = head.logits(model.base_model(**inputs, use_cache=False)[0])
        except Exception as err:  # a head that does not take the decoder's output as it is
            return HeadNotReproducible(
                f"{name}: its LM head does not apply to its decoder's hidden states ({type(err).__name__}: {err}), "
                f"so the chunked loss cannot compute its logits. " + _USE_PLAIN
            )
    if got.shape != expected.shape:
        return HeadNotReproducible(
            f"{name}: the LM head applied to the decoder's hidden states gives logits of shape {tuple(got.shape)}, "
            f"the model's forward {tuple(expected.shape)}, so the chunked loss cannot reproduce them. " + _USE_PLAIN
        )
    eps = torch.finfo(_precision(model, expected)).eps
    expected, got = expected.double(), got.double()
    scale = float(expected.abs().amax())
    diff = float((got - expected).abs().amax())
    tol = 4 * eps * max(scale, 1e-30)
    if not diff <= tol:  # NaN fails too
        return HeadNotReproducible(
            f"{name}: its forward does something to the logits after the LM head that lit_heads does not know "
            f"(found: {_describe(head)}); the chunked loss's logits differ from the model's by {diff:.3g} "
            f"(largest logit {scale:.3g}). " + _USE_PLAIN
        )
    return head


def _precision(model: nn.Module, logits: torch.Tensor) -> torch.dtype:
    # The logits come in the head's compute dtype (autocast's, under mixed precision); a half
    # precision anywhere on the way bounds the agreement to be expected.
    weight = model.get_input_embeddings().weight
    dtypes = [logits.dtype, weight.dtype] + ([torch.get_autocast_dtype(weight.device.type)]
                                             if torch.is_autocast_enabled(weight.device.type) else [])
    return max(dtypes, key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)


def _describe(head: _Head) -> str:
    parts = [f"{k} {v:g}" for k, v in (("x", head.multiply), ("/", head.divide), ("softcap", head.softcap))
             if v is not None]
    return ", ".join(parts) if parts else "no logit transform"
