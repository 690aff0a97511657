"""The paper's reference activation-pattern procedure, as the authors' release runs it.

This is the *slow, literal* measurement that `lit_heads.heads.scoring.compute_ap` replaces, kept as
its own module so benchmarks can time it and compare patterns. It shares no scoring code with
lit_heads (only the model loader):

- eager attention, with the post-softmax attention probabilities Γ kept in the autograd graph and
  their gradients retained (`retain_grad`). The release patches the installed transformers source
  for this; here the same eager computation is registered with `transformers.AttentionInterface`
  under the name `REF`, with transformers' own eager mask function registered under the same name
  in `AttentionMaskInterface` (without a mask function the model would silently run non-causal);
- every sample right-padded to `pad_to` = 1,024 tokens (attention mask 0, labels -100);
- one sample per forward/backward (batch size 1), the Hugging Face loss (token-averaged
  cross-entropy over the response tokens), a full `loss.backward()` (parameter gradients are
  computed too, as in a training-style backward; they are discarded after each sample);
- per sample, layer and head: s = Σ_{q,k} Γ[q,k] · ∂L/∂Γ[q,k]; AP[l, h] = mean over samples of |s|.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

REF = "lit_heads_paper_reference"
PAD_TO = 1024

_GAMMAS: list[torch.Tensor] = []


def _eager_retain_gamma(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, plus `retain_grad` on the post-softmax probabilities Γ."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is None:
        raise RuntimeError("reference attention got no mask: the model would run non-causal")
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask[..., : key.shape[-2]]
    # float32 softmax as transformers' eager attention does (float64 for a float64 model, so a
    # float64 reference is float64 throughout).
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    gamma = torch.softmax(logits, dim=-1, dtype=softmax_dtype).to(query.dtype)
    if gamma.requires_grad:
        gamma.retain_grad()
        _GAMMAS.append(gamma)
    out = torch.matmul(gamma, value)
    return out.transpose(1, 2).contiguous(), gamma


AttentionInterface.register(REF, _eager_retain_gamma)
AttentionMaskInterface.register(REF, eager_mask)


def load_reference_model(name: str):
    from lit_heads.models import load_model

    model = load_model(name, attn_implementation=REF)
    model.eval()  # no dropout (SmolLM2 has none anyway); parameters keep requires_grad=True
    return model


def pad_sample(sample: dict, pad_id: int, pad_to: int = PAD_TO) -> dict[str, torch.Tensor]:
    """One encoded sample ({input_ids, labels} lists) right-padded to `pad_to` tokens, batch of 1."""
    ids, labels = sample["input_ids"], sample["labels"]
    n = len(ids)
    if n > pad_to:
        raise ValueError(f"sample has {n} tokens, more than the reference's fixed length {pad_to}")
    pad = pad_to - n
    return {
        "input_ids": torch.tensor([ids + [pad_id] * pad]),
        "attention_mask": torch.tensor([[1] * n + [0] * pad]),
        "labels": torch.tensor([labels + [-100] * pad]),
    }


def reference_scores(model, samples: list[dict], pad_id: int, pad_to: int = PAD_TO) -> torch.Tensor:
    """Signed per-sample scores [N, n_layers, n_heads] (float64), one sample at a time."""
    out = []
    for sample in samples:
        batch = pad_sample(sample, pad_id, pad_to)
        _GAMMAS.clear()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        if len(_GAMMAS) != model.config.num_hidden_layers:
            raise RuntimeError(f"captured {len(_GAMMAS)} attention matrices, expected one per layer")
        out.append(torch.stack([(g.detach() * g.grad)[0].sum(dim=(-1, -2)).double() for g in _GAMMAS]))
        _GAMMAS.clear()
        model.zero_grad(set_to_none=True)
        del loss
    return torch.stack(out)


def reference_ap(model, samples: list[dict], pad_id: int, pad_to: int = PAD_TO) -> torch.Tensor:
    """AP [n_layers, n_heads] (float64) = mean over samples of |Σ Γ ∂L/∂Γ|."""
    return reference_scores(model, samples, pad_id, pad_to).abs().mean(0)
