"""Head ablation without model surgery: replace chosen heads' outputs at the input of the attention
output projection, the same tensor AP scoring reads (viewed [batch, seq, n_heads, head_dim]).

    means = head_output_means(model, batches)                 # [L, H, head_dim], one forward pass
    with HeadMask(model, [(3, 1), (7, 4)], mode="mean", means=means):
        logits = model(**inputs).logits                       # heads (3, 1) and (7, 4) ablated

Two modes: `zero` (the head contributes nothing to the output projection, exactly as if its columns
of o_proj.weight were zero) and `mean` (the head outputs its mean over the probe data at every
position, as if those columns were zero and o_proj had a bias of W[:, head] @ mean). Mean ablation
removes what the head says about *this* input while keeping its average contribution, so it does not
push the residual stream off its usual range the way zeroing can.

The hook is a forward pre-hook on each touched o_proj: it works with every attention kernel and with
cached generation (each decoding step passes through it), and leaves the weights untouched. Leaving
the context removes it. No Lightning here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lit_heads.errors import ConfigError, DataError
from lit_heads.heads.layout import HeadLayout, find_heads

__all__ = ["MASK_MODES", "HeadMask", "head_output_means"]

MASK_MODES = ("zero", "mean")

_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class HeadMask:
    """Context manager that ablates `heads` (a list of (layer, head) query-head pairs) of `model`.

    mode: 'zero' or 'mean'; 'mean' needs `means` [n_layers, n_heads, head_dim] from
    `head_output_means` on the same model. An empty head list is allowed and changes nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Sequence[tuple[int, int]],
        mode: str = "zero",
        means: torch.Tensor | None = None,
        layout: HeadLayout | None = None,
    ):
        if mode not in MASK_MODES:
            raise ConfigError(
                f"Unknown head mask mode {mode!r}. Use 'zero' (the head's output is replaced by zeros) or 'mean' "
                f"(by its mean over the probe data, from head_output_means)."
            )
        self.layout = layout if layout is not None else find_heads(model)
        n_layers, n_heads = self.layout.shape
        by_layer: dict[int, list[int]] = {}
        for entry in heads:
            layer, head = (int(x) for x in entry)
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise ConfigError(
                    f"Head (layer={layer}, head={head}) is out of range: the model has {n_layers} layers x {n_heads} "
                    f"heads (layers 0..{n_layers - 1}, heads 0..{n_heads - 1}). Was the head list made for another "
                    f"model?"
                )
            by_layer.setdefault(layer, [])
            if head not in by_layer[layer]:
                by_layer[layer].append(head)
        if mode == "mean":
            expected = (n_layers, n_heads, self.layout.head_dim)
            if means is None or tuple(means.shape) != expected:
                got = None if means is None else list(means.shape)
                raise ConfigError(
                    f"Mean ablation needs the per-head output means of this model, shape {list(expected)} "
                    f"[layers, heads, head_dim]; got {got}. Compute them with head_output_means(model, batches)."
                )
        self.mode = mode
        self.means = means
        self.heads = {layer: sorted(hs) for layer, hs in sorted(by_layer.items())}
        self._handles: list = []

    def __enter__(self) -> "HeadMask":
        if self._handles:
            raise RuntimeError("HeadMask is already active")
        try:
            for layer, heads in self.heads.items():
                lh = self.layout.layers[layer]
                self._handles.append(lh.o_proj.register_forward_pre_hook(self._make_hook(layer, heads)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: int, heads: list[int]):
        n_heads, head_dim = self.layout.n_heads, self.layout.head_dim
        index = torch.tensor(heads, dtype=torch.long)
        fill = self.means[layer, index].detach() if self.mode == "mean" else None  # [k, head_dim]

        def pre_hook(module, args):
            x = args[0]
            # Out of place: the caller's tensor may be needed by autograd or by another hook.
            out = x.clone()
            view = out.view(*out.shape[:-1], n_heads, head_dim)
            idx = index.to(out.device)
            if fill is None:
                view[..., idx, :] = 0
            else:
                view[..., idx, :] = fill.to(device=out.device, dtype=out.dtype)
            return (out, *args[1:])

        return pre_hook


@torch.no_grad()
def head_output_means(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, layout: HeadLayout | None = None
) -> torch.Tensor:
    """Mean output of every head over all real (attention_mask 1) token positions of `batches`:
    float32 [n_layers, n_heads, head_dim], accumulated in float64 in one forward pass per batch.

    batches: dicts with input_ids and attention_mask ([B, T]; position_ids passed on when present);
    prompt and response positions count alike, padding does not. Runs in eval mode (no dropout) and
    restores every module's train/eval mode.
    """
    layout = layout if layout is not None else find_heads(model)
    n_layers, n_heads, head_dim = layout.n_layers, layout.n_heads, layout.head_dim
    sums = torch.zeros(n_layers, n_heads * head_dim, dtype=torch.float64)
    count = 0
    mask_now: list[torch.Tensor] = []

    def make_hook(layer: int):
        def pre_hook(module, args):
            x = args[0]
            keep = mask_now[0].to(x.device).reshape(-1).bool()
            sums[layer] += x.reshape(-1, x.shape[-1])[keep].sum(dim=0, dtype=torch.float64).cpu()
            return None

        return pre_hook

    modes = {m: m.training for m in model.modules()}
    handles = [lh.o_proj.register_forward_pre_hook(make_hook(lh.index)) for lh in layout.layers]
    try:
        model.eval()
        device = next(model.parameters()).device
        for i, batch in enumerate(batches):
            if not isinstance(batch, Mapping) or "input_ids" not in batch or "attention_mask" not in batch:
                raise DataError(f"head_output_means batch {i} must be a dict with input_ids and attention_mask [B, T].")
            mask = batch["attention_mask"]
            mask_now[:] = [mask]
            inputs = {k: batch[k].to(device) for k in _FORWARD_KEYS if batch.get(k) is not None}
            model(**inputs, use_cache=False)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if count == 0:
        raise DataError("head_output_means got no real token positions: the batches were empty or fully padded.")
    return (sums / count).view(n_layers, n_heads, head_dim).to(torch.float32)
