"""The independent AP reference: Eq. 2 computed literally from the attention matrices Γ.

Two ways to get Γ, both eager, both independent of lit_heads' hook on the output projection:

- `REF`, an attention function registered with transformers' `AttentionInterface` (explicit softmax,
  Γ kept with `retain_grad`), with its own mask function registered with `AttentionMaskInterface`
  (without one the model would silently run non-causal). The mask is computed here (causal and
  padding) and intersected with the model's own mask pattern (sliding windows, chunks), which is
  part of what the model computes. Used for every model that dispatches attention through the
  interface.
- For models that compute attention in their own code, eager attention with
  `output_attentions=True`: the returned Γ is the tensor that multiplies the values, so
  `autograd.grad` with respect to it is ∂L/∂Γ.

Either way each sample's loss is backpropagated on its own: AP[l, h] = mean_b |Σ_{q,k} Γ ∂L_b/∂Γ|.
"""

from __future__ import annotations

import copy

import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM

REF = "lit_heads_ref_eager"
_GAMMAS: list[torch.Tensor] = []

# Tensor arguments some models pass to the attention function that do not change the result of
# eager attention in a full forward without cache (any other tensor argument is refused, so the
# reference never silently computes something else; flags and sizes are ignored).
_IGNORED = {"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "indices"}


def _ref_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, s_aux=None, sinks=None,
                   position_bias=None, **kwargs):
    unknown = {k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _IGNORED}
    assert not unknown, f"reference attention does not implement {sorted(unknown)}"
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    assert attention_mask is not None, "reference mask function not used: the model would run non-causal"
    logits = (query @ key.transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if position_bias is not None:
        logits = logits + position_bias
    logits = logits + attention_mask[..., : key.shape[-2]]
    sink = s_aux if s_aux is not None else sinks
    if sink is not None:
        # Attention sinks (GPT-OSS): one extra logit per head that takes probability mass but has no value.
        col = sink.reshape(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[2], 1).to(logits.dtype)
        gamma = torch.softmax(torch.cat([logits, col], dim=-1).float(), dim=-1)[..., :-1]
    else:
        gamma = torch.softmax(logits.float(), dim=-1)
    gamma.retain_grad()
    _GAMMAS.append(gamma)
    out = gamma.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), gamma


def _ref_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
              dtype=torch.float32, **kwargs):
    device = attention_mask.device if attention_mask is not None else "cpu"
    q = torch.arange(q_length, device=device)[:, None] + q_offset
    k = torch.arange(kv_length, device=device)[None, :] + kv_offset
    allowed = (k <= q)[None, None].expand(batch_size, 1, q_length, kv_length)
    if mask_function is not None:
        b = torch.arange(batch_size, device=device)[:, None, None, None]
        h = torch.zeros((), dtype=torch.long, device=device)
        allowed = allowed & mask_function(b, h, q[None, None], k[None, None]).expand_as(allowed)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_length].bool()
    # finfo.min, not -inf: fully masked query rows (left padding) stay finite.
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


AttentionInterface.register(REF, _ref_attention)
AttentionMaskInterface.register(REF, _ref_mask)


def ref_losses(logits, labels):
    """Per-sample token-mean CE over response tokens, written out position by position."""
    out = []
    for b in range(labels.shape[0]):
        terms = [
            -torch.log_softmax(logits[b, t].float(), dim=-1)[labels[b, t + 1]]
            for t in range(labels.shape[1] - 1)
            if labels[b, t + 1] != -100
        ]
        out.append(torch.stack(terms).mean())
    return out


def _rebuilt(model, attn_implementation):
    # Models outside the AttentionInterface only take their attention implementation at
    # construction (switching later is ignored, with a log line): build anew, copy the weights.
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn_implementation,
                                           dtype=next(model.parameters()).dtype)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def reference_model(model):
    """A copy of `model` whose attention records Γ: ("interface", copy) when it runs `REF`,
    else ("output_attentions", eager copy)."""
    ref = copy.deepcopy(model)
    try:
        ref.set_attn_implementation(REF)
    except (ValueError, NotImplementedError, AttributeError, TypeError):
        pass
    if ref.config._attn_implementation == REF:
        return "interface", ref.eval()
    return "output_attentions", _rebuilt(model, "eager")


def reference_ap_of(model, batch, n_layers=None):
    """(AP [L, H] float64, per-sample signed scores [B, L, H], how Γ was taken) for the weights of
    `model` (which is not changed)."""
    how, ref = reference_model(model)
    ref.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    _GAMMAS.clear()
    out = ref(**inputs, use_cache=False, output_attentions=how == "output_attentions")
    if how == "interface" and not _GAMMAS:
        # The model accepted the name but computes attention in its own code: take Γ from it instead.
        how, ref = "output_attentions", _rebuilt(model, "eager")
        out = ref(**inputs, use_cache=False, output_attentions=True)
    gammas = list(_GAMMAS) if how == "interface" else [a for a in out.attentions if a is not None]
    _GAMMAS.clear()
    if n_layers is not None:
        assert len(gammas) == n_layers, f"{len(gammas)} attention matrices for {n_layers} layers ({how})"
    losses = ref_losses(out.logits, batch["labels"])
    per_sample = []
    for b, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, gammas, retain_graph=True, allow_unused=True)
        per_sample.append(torch.stack([
            (g * gr)[b].sum(dim=(-1, -2)).double() if gr is not None else torch.zeros(g.shape[1], dtype=torch.float64)
            for g, gr in zip(gammas, grads)
        ]))
    per_sample = torch.stack(per_sample)
    return per_sample.abs().mean(0), per_sample, how


def max_rel_err(got, ref):
    got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return ((got - ref).abs() / ref.abs()).max().item()
