"""LoRA through PEFT: the usual parameter-efficient baseline, in any `lit_heads fit` and as a `compare` arm.

Add to a fit config:

    trainer:
      callbacks:
        - class_path: lit_heads.callbacks.lora.LoRAFinetuning
          init_args: {r: 8, alpha: 16, dropout: 0.0, targets: null}   # null: the attention projections

What happens, and when (the same order as ``HeadRestrictedFinetuning``):

1. ``setup`` (before the checkpoint is restored and before ``configure_optimizers``; for
   validate/test too, so their ``ckpt_path`` loads): the target modules are resolved against the
   model — by default every linear layer inside the attention modules that ``find_heads`` locates
   (q/k/v/o in Llama-style models, ``c_attn``/``c_proj`` in GPT-2, ...) — and
   ``peft.get_peft_model`` replaces ``pl_module.model`` by a ``PeftModel``: base weights frozen,
   LoRA A (random) and B (zero) trainable, so training starts from the base model's logits. The
   module's optimizer gets only the parameters with ``requires_grad``: the adapters.
2. Checkpoints hold base weights and adapters (PEFT's parameter names) and this callback's options;
   a resume wraps the model the same way before Lightning loads the weights, and a checkpoint made
   with other options is refused (``load_state_dict``).
3. ``on_fit_end`` (and ``merge_for_export``, which ``ExportHF`` calls first) merges the adapters into
   the weights (``merge_and_unload``): ``pl_module.model`` is a plain Hugging Face model again and
   exports in plain HF format.

The adapters are PEFT's; nothing here computes LoRA itself.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_heads.errors import ConfigError

ALL_LINEAR = "all-linear"
INSTALL = "pip install 'peft>=0.21'"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (itself, when it is not wrapped). Its target
    layers are PEFT layers whose input is the original layer's input, so head hooks on them see the
    same tensors."""
    peft = sys.modules.get("peft")  # a model can only be a PeftModel once peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"LoRAFinetuning trains through the `peft` library, which is not installed: `{INSTALL}`."
        ) from None
    return peft


def _adaptable(module: nn.Module) -> bool:
    """Layers LoRA adapts here: nn.Linear and GPT-2's Conv1D (a linear layer with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct short names (last name component) of the model's linear layers, in model order."""
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)]
    return list(dict.fromkeys(names))


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Qualified names of the linear layers LoRA adapts.

    None: every linear layer inside the attention modules `find_heads` locates. 'all-linear' (alone):
    every linear layer but the output embedding. Otherwise each name is matched as PEFT matches it (the
    qualified name, or its last components: `q_proj`, `self_attn.o_proj`) and must name at least one
    linear layer."""
    names = {id(m): n for n, m in model.named_modules()}
    if targets is None:
        from lit_heads.heads.layout import find_heads

        layout = find_heads(model)
        return [f"{names[id(layer.attention)]}.{n}" for layer in layout.layers
                for n, m in layer.attention.named_modules() if n and _adaptable(m)]
    linear = [n for n, m in model.named_modules() if n and _adaptable(m)]
    if targets == [ALL_LINEAR]:
        output = model.get_output_embeddings()
        return [n for n in linear if output is None or n != names.get(id(output))]
    resolved: list[str] = []
    for target in targets:
        found = [n for n in linear if n == target or n.endswith("." + target)]
        if not found:
            raise ConfigError(
                f"LoRA target module {target!r} is not a linear layer of the model ({type(model).__name__}). Its "
                f"linear layers are named: {', '.join(linear_layer_names(model))}. Give some of those names (e.g. "
                f"q_proj,v_proj), '{ALL_LINEAR}', or no targets for the attention projections."
            )
        resolved += [n for n in found if n not in resolved]
    return resolved


def short_names(qualified: list[str]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in qualified))


class LoRAFinetuning(L.Callback):
    """Train LoRA adapters (PEFT) on the target linear layers; every base weight stays bit-identical.
    See the module docstring for the order of events."""

    def __init__(self, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 targets: list[str] | str | None = None):
        """
        Args:
            r: LoRA rank (>= 1): each adapted layer W (out x in) trains B (out x r) and A (r x in).
            alpha: scale of the update, B A x * alpha / r; default 2 r (an update scale of 2 at any rank).
            dropout: dropout on the adapter's input in training (0 to < 1).
            targets: linear layers to adapt: names as PEFT matches them (`q_proj`, `self_attn.o_proj`),
                as a list or a comma-separated string, or 'all-linear'; default (null) every linear layer
                of the attention modules (q/k/v/o in Llama-style models).
        """
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRAFinetuning: the rank r must be an integer >= 1 (e.g. 8), got {r!r}.")
        if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise ConfigError(
                f"LoRAFinetuning: alpha must be a number > 0 (the update is scaled by alpha / r), got {alpha!r}."
            )
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ConfigError(f"LoRAFinetuning: dropout must be >= 0 and < 1, got {dropout!r}.")
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",")]
        if targets is not None:
            targets = list(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(
                    f"LoRAFinetuning: targets must be non-empty module names (e.g. q_proj,v_proj), '{ALL_LINEAR}', "
                    f"or null for the attention projections; got {targets!r}."
                )
            if ALL_LINEAR in targets and len(targets) > 1:
                raise ConfigError(
                    f"LoRAFinetuning: '{ALL_LINEAR}' already names every linear layer; give it alone, not with "
                    f"{targets!r}."
                )
        _import_peft()  # fail here, before a model is loaded
        self.r, self.dropout, self.targets = r, float(dropout), targets
        self.alpha = float(alpha) if alpha is not None else float(2 * r)
        self.modules: list[str] = []  # qualified names of the adapted layers, set in setup
        self.summary: dict = {}
        self._wrapped = None  # the PeftModel until it is merged

    @property
    def applied(self) -> bool:
        return self._wrapped is not None

    # ---- wrap ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        # validate/test too: a LoRA checkpoint (`--ckpt_path`) holds PEFT's parameter names, and
        # Lightning loads it after this hook.
        if stage not in ("fit", "validate", "test") or self.applied:
            return
        from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning

        if any(isinstance(c, HeadRestrictedFinetuning) for c in trainer.callbacks):
            raise ConfigError(
                "LoRAFinetuning and HeadRestrictedFinetuning are both in this fit's callbacks, but each decides "
                "on its own what trains. Keep one of them (`lit_heads compare` runs them as separate arms)."
            )
        self._wrapped = self.wrap(pl_module.model)
        pl_module.model = self._wrapped
        from lit_heads.module import model_size

        trainable, _ = self._wrapped.get_nb_trainable_parameters()  # PEFT's own count
        self.summary = {**self._options(), "trainable": trainable, "total": model_size(self._wrapped)}
        rank_zero_info(format_lora(self.summary))

    def wrap(self, model: nn.Module):
        """`model` with LoRA adapters on the target layers (a PeftModel; `model` is changed in place)."""
        peft = _import_peft()
        from transformers.pytorch_utils import Conv1D

        self.modules = resolve_targets(model, self.targets)
        layers = dict(model.named_modules())
        config = peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.modules, bias="none",
            task_type="CAUSAL_LM", fan_in_fan_out=any(isinstance(layers[n], Conv1D) for n in self.modules),
        )
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5 for the deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, config)

    def _options(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                "modules": short_names(self.modules), "n_modules": len(self.modules)}

    # ---- merge -----------------------------------------------------------------------------------
    def merge_for_export(self, pl_module) -> None:
        """Merge the adapters into the weights (idempotent): afterwards `pl_module.model` is plain HF."""
        if self._wrapped is not None and pl_module.model is self._wrapped:
            pl_module.model = self._wrapped.merge_and_unload()
        self._wrapped = None

    def on_fit_end(self, trainer, pl_module):
        # After every checkpoint of the fit, so checkpoints keep the adapters their optimizer state refers to.
        self.merge_for_export(pl_module)

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                "modules": self.modules}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning loads this after setup() wrapped the model and after the weights loaded (lit_heads
        # fit's CheckpointSafety already refused other ranks or targets by their shapes and names);
        # alpha and dropout change no shape, so they are compared here.
        keys = ("r", "alpha", "dropout", "modules")
        if self.modules and any(state_dict.get(k) != getattr(self, k) for k in keys):
            def show(state):
                return ", ".join(f"{k}={state.get(k)!r}" for k in ("r", "alpha", "dropout", "targets"))

            raise ConfigError(
                f"The checkpoint was trained with LoRA {show(state_dict)} on {len(state_dict.get('modules') or [])} "
                f"layers, but this fit uses {show(self.state_dict())} on {len(self.modules)} layers. Resume with "
                "the LoRAFinetuning options the checkpoint was trained with."
            )


def lora_from_checkpoint(model: nn.Module, checkpoint: dict):
    """A PeftModel on `model` matching a checkpoint written with LoRAFinetuning, so its state dict
    (PEFT's parameter names) loads; None when the checkpoint has no LoRA state."""
    states = checkpoint.get("callbacks") or {}
    state = next((s for key, s in states.items() if str(key).startswith(LoRAFinetuning.__qualname__)), None)
    if state is None:
        return None
    callback = LoRAFinetuning(r=state["r"], alpha=state["alpha"], dropout=state["dropout"], targets=state["modules"])
    return callback.wrap(model)


def format_lora(s: dict) -> str:
    return (
        f"lit_heads: LoRA (PEFT) r={s['r']}, alpha={s['alpha']:g}, dropout={s['dropout']:g} on {s['n_modules']} layers "
        f"({', '.join(s['modules'])}): trained scalars {s['trainable']:,} = "
        f"{100 * s['trainable'] / max(s['total'], 1):.3f}% of {s['total']:,}"
    )
