"""Exact, fast activation-pattern (AP) scoring, Eq. 2 of arXiv 2409.15820.

    AP[l, h] = (1/N) Σ_samples | Σ_{q,k} Γ[q,k] ∂L/∂Γ[q,k] |

Because head h's output is o_q = Σ_k Γ[q,k] v_k, the inner sum equals Σ_q <o_q, ∂L/∂o_q>, so no
attention matrix is needed: the head outputs are the input x of the attention output projection,
viewed [B, T, H, head_dim], and each sample's signed score is Σ_{t,d} x ⊙ ∂L_b/∂x. This works with
any attention kernel (eager, sdpa, flash).

Per-sample gradients come from one batched backward of Σ_b L_b: samples do not interact in a causal
LM forward, so the rows of sample b in ∂(Σ L)/∂x are exactly ∂L_b/∂x. Padding positions carry zero
loss gradient and (being masked as keys) influence no real token, so they add nothing.

Left padding shifts every real token's position by the padding length unless the batch carries
`position_ids`. Rotary and ALiBi models do not care, and some (OPT) derive positions from the
attention mask themselves, but a model with absolute position embeddings (GPT-2) silently computes
something else. `compute_ap` therefore derives `position_ids` from the attention mask for a
left-padded batch that has none; where the model takes no `position_ids`, it checks once that left
padding leaves the model's output unchanged, and refuses the batch otherwise. `HeadGateCapture`
cannot change the caller's forward, so it refuses a left-padded batch without `position_ids` on a
model whose output left padding changes.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lit_heads.errors import ConfigError, DataError
from lit_heads.heads.layout import HeadLayout, eval_mode, find_heads, unwrap_model
from lit_heads.heads.lm_loss import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    decoder_of,
    labelled,
    logits_token_losses,
    sample_means,
    token_losses,
)
from lit_heads.heads.pattern import FORMULA_VERSION, Pattern

__all__ = ["HeadGateCapture", "compute_ap", "per_sample_loss", "per_sample_scale"]


class HeadGateCapture:
    """Record per-sample, per-head gate scores Σ_{t,d} x ⊙ ∂loss/∂x during any backward pass.

    Use as a context manager around forward + backward; after backward, `pop()` returns a signed
    float32 tensor [B, n_layers, n_heads] (the batches of several forwards before one backward are
    concatenated in forward order) and clears the record. A training loop gets a *free* AP this way
    from its own backward:

        with HeadGateCapture(model) as cap:
            loss = model(**batch).loss          # HF: mean over all response tokens of the batch
            (loss * loss_scale).backward()
            scores = cap.pop(scale=per_sample_scale(batch["labels"], loss_scale=loss_scale))
        ap_batch = scores.abs().mean(0)      # this batch's AP, equal to compute_ap on it

    `scale` (a float or a per-sample tensor [B]) multiplies the recorded scores to turn the gradient
    of the training loss into the gradient of each sample's own token-averaged loss L_b: for a loss
    averaged over all N response tokens of the batch, the gradient reaching sample b is
    (n_b / N) ∂L_b, times any loss-scaler factor (fp16 GradScaler) and 1/accumulate_grad_batches, so
    scale = N / n_b / loss_scale * accumulate; `per_sample_scale` computes it.

    `require_input_grad` (default True) makes the input-embedding output require grad, so every
    layer's head outputs are in the autograd graph even when early layers or all parameters are
    frozen (head-restricted training); parameters' `requires_grad` flags are never touched. Layers
    that still see no gradient are NaN in `pop()`.

    Not supported: reentrant gradient checkpointing combined with several forwards before one
    backward (recomputation order then mixes up the batches' order).
    """

    def __init__(self, model: nn.Module, layout: HeadLayout | None = None, *, scale: float | torch.Tensor | None = None,
                 require_input_grad: bool = True, retain_inputs: bool = False):
        self.model = unwrap_model(model)
        self.layout = layout if layout is not None else find_heads(self.model)
        self.scale = scale
        self.require_input_grad = require_input_grad
        # compute_ap needs the live tensors to call autograd.grad on them; training loops do not,
        # and holding them past backward would keep activations alive.
        self.retain_inputs = retain_inputs
        self.inputs: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._records: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self._calls: dict[int, int] = defaultdict(int)

    # -- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> "HeadGateCapture":
        if self._handles:
            raise RuntimeError("HeadGateCapture is already active")
        for lh in self.layout.layers:
            self._handles.append(lh.o_proj.register_forward_pre_hook(self._make_pre_hook(lh.index)))
        # On the decoder too: the chunked loss (lm_loss) runs the decoder without the model's forward.
        for module in {self.model, decoder_of(self.model) or self.model}:
            self._handles.append(module.register_forward_pre_hook(self._check_padding, with_kwargs=True))
        if self.require_input_grad:
            emb = self.model.get_input_embeddings()
            self._handles.append(emb.register_forward_hook(_require_grad_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.inputs.clear()

    def _check_padding(self, module, args, kwargs):
        inputs = _bound_inputs(self.model, args, kwargs)
        mask = inputs.get("attention_mask")
        if inputs.get("position_ids") is None and isinstance(mask, torch.Tensor) and _left_padded(mask):
            if not _left_padding_is_harmless(self.model):
                raise DataError(
                    f"HeadGateCapture: a left-padded batch without position_ids reached "
                    f"{type(self.model).__name__}, whose output changes with left padding (absolute position "
                    f"embeddings): every real token is scored at a shifted position. Pad on the right (the SFT "
                    f"datamodule does), or pass position_ids = attention_mask.cumsum(-1) - 1 (clamped at 0)."
                )
        return None

    def _make_pre_hook(self, layer: int):
        n_heads, head_dim = self.layout.n_heads, self.layout.layers[layer].head_dim

        def pre_hook(module, args):
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            seq = self._calls[layer]
            self._calls[layer] += 1
            x_saved = x.detach()

            def grad_hook(grad):
                prod = x_saved.float() * grad.float()
                score = prod.reshape(prod.shape[0], -1, n_heads, head_dim).sum(dim=(1, 3))
                self._records[layer].append((seq, score))

            x.register_hook(grad_hook)
            if self.retain_inputs:
                self.inputs.append(x)
            return None

        return pre_hook

    # -- results --------------------------------------------------------------------------------
    def pop(self, scale: float | torch.Tensor | None = None) -> torch.Tensor | None:
        """Signed scores [B, n_layers, n_heads] recorded since the last pop (None if nothing was)."""
        records, self._records = self._records, defaultdict(list)
        self._calls = defaultdict(int)
        self.inputs.clear()
        if not records:
            return None
        per_layer = {l: torch.cat([s for _, s in sorted(r, key=lambda t: t[0])]) for l, r in records.items()}
        ref = next(iter(per_layer.values()))
        B = ref.shape[0]
        out = torch.full((B, self.layout.n_layers, self.layout.n_heads), math.nan, dtype=torch.float32,
                         device=ref.device)
        for l, s in per_layer.items():
            if s.shape[0] != B:
                raise RuntimeError(
                    f"layer {l} recorded {s.shape[0]} samples but another layer {B}: the forward and backward passes "
                    f"since the last pop() do not match (pop after every backward)"
                )
            out[:, l] = s
        scale = self.scale if scale is None else scale
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32, device=out.device)
            if scale.dim() == 1:
                if scale.shape[0] != B:
                    raise ConfigError(
                        f"HeadGateCapture scale has {scale.shape[0]} entries but {B} samples were recorded; pass one "
                        f"scale per sample (per_sample_scale(labels)) or a single float."
                    )
                scale = scale[:, None, None]
            out = out * scale
        return out


def _require_grad_hook(module, args, output):
    # Same trick as transformers' enable_input_require_grads: a frozen embedding's output is a
    # tensor outside the graph; making it require grad puts every later activation in the graph
    # without touching any parameter's requires_grad.
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


# ------------------------------------------------------------------------------------------------
# losses


def _response_counts(labels: torch.Tensor) -> torch.Tensor:
    return labelled(labels).sum(dim=1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-averaged cross-entropy of each sample over its response tokens, [B], float32, from full
    logits (`compute_ap` computes the same from the hidden states, `lit_heads.heads.lm_loss`).

    Uses the causal shift of Hugging Face models (logits at t score labels at t+1). A sample with
    no response tokens gives NaN; `compute_ap` rejects such samples up front.
    """
    return sample_means(logits_token_losses(logits, labels), labels)


def per_sample_scale(labels: torch.Tensor, *, reduction: str = "token_mean", loss_scale: float = 1.0,
                     accumulate_grad_batches: int = 1) -> torch.Tensor:
    """Per-sample factors that turn gate scores captured from a *training* backward into the scores
    of each sample's own token-averaged loss (what `compute_ap` measures).

    reduction: how the training loss was reduced over the batch — "token_mean" (mean over all N
    response tokens of the batch, the Hugging Face default; sample b's gradient is (n_b/N)·∂L_b) or
    "sample_mean" (mean of the per-sample token means; gradient ∂L_b / B).
    loss_scale: the factor the loss was multiplied with before backward (fp16 GradScaler's scale).
    accumulate_grad_batches: the loss divisor used for gradient accumulation.
    """
    n = _response_counts(labels).to(torch.float32)
    if reduction == "token_mean":
        s = n.sum() / n
    elif reduction == "sample_mean":
        s = torch.full_like(n, float(labels.shape[0]))
    else:
        raise ConfigError(f"per_sample_scale reduction={reduction!r}; use 'token_mean' or 'sample_mean'.")
    # A sample without response tokens has zero gradient; scale 0 keeps it at 0 instead of inf*0.
    s = torch.where(n > 0, s, torch.zeros_like(s))
    return s * (float(accumulate_grad_batches) / float(loss_scale))


# ------------------------------------------------------------------------------------------------
# padding side


def _left_padded(mask: torch.Tensor) -> bool:
    """True if some sample has a padding position before one of its real tokens."""
    if mask.dim() != 2:
        return False
    real = mask != 0
    real_later = real.flip(1).cummax(dim=1).values.flip(1)
    return bool((~real & real_later).any())


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that number each sample's real tokens 0, 1, ... whatever the padding side."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _forward_params(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _bound_inputs(model: nn.Module, args, kwargs) -> dict:
    params = [n for n, p in _forward_params(model).items()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(params, args)), **kwargs}


_PADDING_HARMLESS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _left_padding_is_harmless(model: nn.Module) -> bool:
    """Whether left padding (without position_ids) leaves the logits of the real tokens unchanged:
    one short sequence, scored alone and behind 3 padding tokens. Cached per model."""
    known = _PADDING_HARMLESS.get(model)
    if known is not None:
        return known
    # The check's own padded forward must not trigger the check again (HeadGateCapture's hook).
    _PADDING_HARMLESS[model] = True
    try:
        harmless = _padding_changes_nothing(model)
    finally:
        del _PADDING_HARMLESS[model]
    _PADDING_HARMLESS[model] = harmless
    return harmless


def _padding_changes_nothing(model: nn.Module) -> bool:
    emb = model.get_input_embeddings()
    device = emb.weight.device
    vocab = emb.num_embeddings
    ids = torch.randint(min(4, vocab - 1), min(vocab, 200), (1, 6), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    padded = torch.cat([torch.full((1, 3), int(ids[0, 0]), device=device), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1).to(device)
    with eval_mode(model), torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        behind = model(input_ids=padded, attention_mask=mask, use_cache=False).logits[:, 3:].float()
    # Rotary embeddings at shifted positions differ by rounding only; shifted absolute position
    # embeddings change the logits by orders of magnitude more.
    tol = 1e-3 if alone.dtype == torch.float32 and emb.weight.dtype == torch.float32 else 5e-2
    return bool(((alone - behind).abs().amax() <= tol * alone.abs().amax()).item())


def _positions_for(model: nn.Module, inputs: dict, index: int) -> None:
    """Give a left-padded batch without position_ids the positions it means (in place), or refuse it."""
    mask = inputs.get("attention_mask")
    if inputs.get("position_ids") is not None or mask is None or not _left_padded(mask):
        return
    if "position_ids" in _forward_params(model):
        inputs["position_ids"] = positions_from_mask(mask)
    elif not _left_padding_is_harmless(model):
        raise DataError(
            f"AP batch {index} is left-padded, and {type(model).__name__} takes no position_ids and computes "
            f"something else for left-padded input (absolute positions counted from the first padding token). "
            f"Pad the batch on the right."
        )


# ------------------------------------------------------------------------------------------------
# compute_ap

_REQUIRED = ("input_ids", "attention_mask", "labels")
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _check_batch(batch: Any, index: int) -> None:
    if not isinstance(batch, Mapping) or any(k not in batch for k in _REQUIRED):
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise DataError(
            f"AP batch {index} must be a dict with {list(_REQUIRED)} ([B, T] tensors; labels -100 on prompt and "
            f"padding); got {got}. Use the SFT datamodule's batches."
        )
    ids, mask, labels = (batch[k] for k in _REQUIRED)
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape != labels.shape:
        raise DataError(
            f"AP batch {index}: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and labels "
            f"{tuple(labels.shape)} must all have the same [batch, seq] shape."
        )
    bad_pad = (labels != IGNORE_INDEX) & (mask == 0)
    if bool(bad_pad.any()):
        b = int(bad_pad.any(dim=1).nonzero()[0])
        raise DataError(
            f"AP batch {index}, sample {b}: labels are set on padding positions (attention_mask 0); padding "
            f"labels must be -100 so padding adds no loss."
        )
    n = _response_counts(labels)
    if bool((n == 0).any()):
        empty = (n == 0).nonzero().flatten().tolist()
        raise DataError(
            f"AP batch {index}, sample(s) {empty}: no response tokens (every label after the first position is "
            f"-100), so the per-sample loss is undefined. Drop these samples, or check that the prompt is not "
            f"truncated over the whole sequence (max length too short)."
        )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def compute_ap(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, layout: HeadLayout | None = None,
               progress: bool = True, device: str | torch.device | None = None,
               meta: Mapping[str, Any] | None = None, loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> Pattern:
    """The activation pattern of `model` on `batches` (Eq. 2): AP[l, h] = mean_b |Σ x ⊙ ∂L_b/∂x|.

    batches: iterable of dicts with input_ids, attention_mask, labels ([B, T]; labels -100 on prompt
    and padding). `position_ids` is passed on when present; a left-padded batch without them gets
    them from the attention mask (see the module docstring).
    device: run on this device (the model is moved there and back); default: where the model is.
    meta: extra Pattern metadata (e.g. data=..., step=...).
    loss_chunk_size: labelled positions whose logits exist at once in the per-sample loss
    (`lit_heads.heads.lm_loss`); 0: the plain path through the model's full logits.

    Leaves the model as found: parameters, their `.grad`, `requires_grad` flags, every module's
    train/eval mode and the CPU/CUDA RNG states. Scoring runs in eval mode (no dropout) under
    `torch.enable_grad()`, so it may be called from validation or inference-mode code. Under an
    initialised torch.distributed, sums and counts are all-reduced: every rank returns the AP of
    the union of all ranks' samples.
    """
    model = unwrap_model(model)
    layout = layout if layout is not None else find_heads(model)
    modes = {m: m.training for m in model.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    home = _model_device(model)
    run_device = torch.device(device) if device is not None else home
    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0

    total = None
    count = 0
    try:
        if run_device != home:
            model.to(run_device)
        model.eval()
        n_batches = len(batches) if hasattr(batches, "__len__") else None
        it = batches
        if progress and rank == 0:
            from tqdm.auto import tqdm

            it = tqdm(batches, total=n_batches, desc="activation pattern", unit="batch", leave=False)
        with torch.inference_mode(False), torch.enable_grad(), HeadGateCapture(
            model, layout, retain_inputs=True
        ) as cap:
            # Created here, not above: under a caller's inference_mode it would be an inference tensor.
            total = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64, device=run_device)
            for i, batch in enumerate(it):
                _check_batch(batch, i)
                # clone(): batches made under inference_mode are inference tensors, unusable in autograd.
                inputs = {k: batch[k].to(run_device).clone() for k in _FORWARD_KEYS if batch.get(k) is not None}
                _positions_for(model, inputs, i)
                labels = batch["labels"].to(run_device).clone()
                losses = token_losses(model, inputs, labels, chunk_size=loss_chunk_size)
                loss = sample_means(losses, labels).sum()
                if len(cap.inputs) == 0:
                    raise RuntimeError("no attention output projection ran during the forward pass")
                # autograd.grad (not backward) w.r.t. the head outputs only: no parameter .grad is
                # written, so accumulated training gradients stay untouched.
                torch.autograd.grad(loss, cap.inputs, allow_unused=True)
                scores = cap.pop()
                del losses, loss
                if torch.isnan(scores).any():
                    raise RuntimeError("some layers received no gradient while scoring")
                total += scores.abs().sum(dim=0).to(torch.float64)
                count += scores.shape[0]
    finally:
        if run_device != home:
            model.to(home)
        for m, mode in modes.items():
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    if dist is not None:
        # NCCL only reduces CUDA tensors; gloo reduces CPU ones.
        red_dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                   else torch.device("cpu"))
        buf = torch.cat([total.flatten().to(red_dev),
                         torch.tensor([float(count)], dtype=torch.float64, device=red_dev)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        total = buf[:-1].view_as(total)
        count = int(round(buf[-1].item()))
    if count == 0:
        raise DataError("compute_ap got no samples: the batches iterable was empty (on every rank).")
    ap = (total / count).to(torch.float32).cpu()
    config = getattr(model, "config", None)
    info = {
        "model": getattr(config, "_name_or_path", None) or layout.arch,
        "arch": layout.arch,
        "n_samples": count,
        "formula_version": FORMULA_VERSION,
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }
    info.update(meta or {})
    return Pattern(ap, info)
