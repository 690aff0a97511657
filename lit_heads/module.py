"""The SFT LightningModule: wraps a Hugging Face causal LM.

Loss is token-averaged cross-entropy over response tokens only (the DataModule labels prompt and
padding with -100), computed by `lit_heads.heads.lm_loss` from the final hidden states of the
response positions, `loss_chunk_size` positions at a time (no [batch, seq, vocab] logits). The
validation and test loss is `ResponseLoss`: the same cross-entropy summed over every response token
of the whole set (on every rank) and divided by their number; its exp is the perplexity. Validation
and test also generate answers for a few held-out prompts and score them with the task's exact-match
checker (`val/acc`, `test/acc`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_heads.atomic import atomic_dir
from lit_heads.errors import ConfigError
from lit_heads.heads.lm_loss import DEFAULT_CHUNK_SIZE, check_chunked_loss, logits_token_losses, mean_loss, token_losses
from lit_heads.models import DEFAULT_MODEL, check_dtype_name, load_model, load_tokenizer, weights_dtype
from lit_heads.optim import WarmupCosine, default_adamw


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens of the whole batch, from full
    logits (the plain path; `SFTModule.loss` is the same number without them)."""
    return mean_loss(logits_token_losses(logits, labels))


def loss_chunk_size(pl_module: L.LightningModule) -> int | None:
    """The fit's `loss_chunk_size`, for the callbacks that score the model with the same loss path (the
    default for a LightningModule without one)."""
    return getattr(pl_module, "hparams", {}).get("loss_chunk_size", DEFAULT_CHUNK_SIZE)


def model_size(model: torch.nn.Module) -> int:
    """Scalars of the model's own weights, without the trainable tensors a fit adds beside them: head
    deltas (parametrizations other than `.original`, lit_heads.heads.restrict) and PEFT adapters
    (LoRA A and B), so every fit reports its share of the same base-model size."""
    added = {id(p) for p in _peft_adapter_parameters(model)}
    return sum(p.numel() for n, p in model.named_parameters()
               if id(p) not in added and (".parametrizations." not in n or n.endswith(".original")))


def _peft_adapter_parameters(model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    if "peft" not in sys.modules:  # a model holds PEFT layers only once peft is imported
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:  # LoRA: lora_A, lora_B, lora_embedding_A/B, ...
                yield from getattr(module, name).parameters()


class ResponseLoss(MeanMetric):
    """The validation (and test) loss: the sum of the cross-entropy of every response token of the set
    divided by the number of those tokens, over all ranks (torchmetrics all-reduces both sums). Unlike
    a mean of per-batch means, a batch of long responses weighs by its tokens; exp of it is exactly
    the perplexity."""

    def __init__(self):
        # "disable": a NaN loss must show as NaN, not be dropped from the mean with a warning.
        super().__init__(nan_strategy="disable")

    def add(self, losses: torch.Tensor) -> None:
        """Add a batch's `SFTModule.token_losses`."""
        self.update(losses)


class SFTModule(L.LightningModule):
    # Read by Lightning's ThroughputMonitor, which warns when it is missing; unknown here, so no FLOPs/MFU.
    flops_per_batch = None

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        optimizer: OptimizerCallable = default_adamw,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        attn_implementation: str | None = None,
        num_generate: int = 16,
        max_new_tokens: int = 48,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_reentrant: bool = False,
        dtype: str | None = None,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        """
        Args:
            model: bundled short name ('smollm2-135m'), local HF directory, .gguf file, or hub id.
            optimizer: optimizer factory (class_path/init_args in YAML); default AdamW(lr=2e-4, wd=0.01).
            scheduler: LR schedule factory; default linear warmup + cosine decay to the last step.
            attn_implementation: 'sdpa' (default of transformers), 'eager', 'flash_attention_2', ...
            num_generate: validation prompts answered by greedy generation for `val/acc` (0 disables).
            max_new_tokens: generation budget per validation prompt.
            gradient_checkpointing: trade compute for activation memory (active in training only).
            gradient_checkpointing_reentrant: use torch's reentrant checkpoint (`use_reentrant=True`)
                instead of the non-reentrant one (the default, and torch's recommendation).
            dtype: dtype the weights load in: float32, bfloat16, float16 or float64. Unset: follow
                `trainer.precision` (bf16-true loads bfloat16 directly; 32-true and the mixed precisions
                load float32). On GPUs, `trainer.precision: bf16-true` (or bf16-mixed) is the usual choice.
            loss_chunk_size: response positions whose logits exist at once in the loss (recomputed in
                backward); 0: the plain path, the model's full [batch, seq, vocab] logits.
        """
        super().__init__()
        # Checked here, before anything loads: a bad option fails in a second.
        check_dtype_name(dtype)
        if gradient_checkpointing_reentrant and not gradient_checkpointing:
            raise ConfigError(
                "model.gradient_checkpointing_reentrant is true but gradient_checkpointing is false, so it would "
                "do nothing. Set gradient_checkpointing: true as well, or drop gradient_checkpointing_reentrant."
            )
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = ResponseLoss()
        self.test_loss = ResponseLoss()

    # ---- the model: loaded in Lightning's configure_model hook ---------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model. A Trainer loads it in `configure_model` (in the strategy's device and
        precision contexts); code that needs it earlier (a callback's `setup`, scripts using the module
        without a Trainer) loads it on first access, the same way."""
        loaded = self._modules.get("model")
        if loaded is None:
            self.configure_model()
            loaded = self._modules["model"]
        return loaded

    def configure_model(self) -> None:
        if self._modules.get("model") is not None:  # Lightning may call it again (fit then test)
            return
        trainer = self._trainer
        dtype = weights_dtype(
            self.hparams.dtype,
            precision=trainer.precision if trainer is not None else None,
            device=trainer.strategy.root_device if trainer is not None else None,
        )
        model = load_model(self.hparams.model, dtype=dtype, attn_implementation=self.hparams.attn_implementation)
        if self.hparams.gradient_checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": self.hparams.gradient_checkpointing_reentrant}
            )
        self.model = model  # nn.Module.__setattr__ registers it in _modules (the property only reads)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def loss(self, batch) -> torch.Tensor:
        """The training loss: mean cross-entropy over every response token of the batch."""
        return mean_loss(self.token_losses(batch))

    def token_losses(self, batch) -> torch.Tensor:
        """Float32 cross-entropy of each response token of the batch (`lit_heads.heads.lm_loss`)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return token_losses(self.model, inputs, batch["labels"], chunk_size=self.hparams.loss_chunk_size)

    # ---- training -------------------------------------------------------------------------
    def on_fit_start(self):
        # from_pretrained returns the model in eval mode and Lightning keeps each submodule's mode, so
        # without this dropout would be off and gradient checkpointing (active only in training) idle.
        # Here, not in on_train_start: Lightning checks the modes (and warns) just before that hook.
        self.train()
        check_chunked_loss(self.model, self.hparams.loss_chunk_size)  # its probe forwards before the first step
        params = list(self.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        total = model_size(self.model)
        rank_zero_info(
            f"lit_heads: trainable parameters {trainable:,} ({100 * trainable / max(total, 1):.2f}% of the "
            f"model's {total:,}), frozen {frozen:,}"
        )

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---- validation and test ----------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self.val_loss.add(self.token_losses(batch))

    def test_step(self, batch, batch_idx):
        self.test_loss.add(self.token_losses(batch))

    def on_validation_epoch_end(self):
        self._log_loss("val", self.val_loss)
        if not self.trainer.sanity_checking:
            self._log_accuracy("val")

    def on_test_epoch_end(self):
        self._log_loss("test", self.test_loss)
        self._log_accuracy("test")

    def _log_loss(self, stage: str, metric: ResponseLoss) -> None:
        loss = metric.compute()  # every rank gets the loss of the whole set
        metric.reset()
        # sync_dist only averages the value every rank already holds (and spares Lightning's warning).
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", loss.exp(), sync_dist=True)

    def _log_accuracy(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not self.hparams.num_generate or datamodule is None or not hasattr(datamodule, "generation_examples"):
            return
        correct, total, rows = self.generation_accuracy(datamodule, self.hparams.num_generate, stage)
        if total:  # nothing gradable: no accuracy rather than a 0 that reads as 0%
            self.log(f"{stage}/acc", correct / total, prog_bar=True, sync_dist=True)  # equal on all ranks already
        self._log_samples(rows, f"{stage}/samples")

    @torch.no_grad()
    def evaluate_loss(self, batches: Iterable[dict]) -> float:
        """`ResponseLoss` of `batches` in eval mode, as validation computes it. Under DDP each rank passes
        its own share (the DataModule's loaders shard by rank) and every rank gets the loss of all."""
        metric = ResponseLoss().to(self.device)
        was_training = self.training
        self.eval()
        # In a Trainer, under its precision (autocast for the mixed ones), as validation runs.
        context = self._trainer.precision_plugin.forward_context if self._trainer is not None else nullcontext
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with context():
                metric.add(self.token_losses(batch))
        self.train(was_training)
        return float(metric.compute())

    def generation_accuracy(self, datamodule, n: int, split: str = "val") -> tuple[int, int, list[list[str]]]:
        """Greedy answers for the first `n` prompts of `split` (val or test), split across ranks and
        summed, so every rank returns the same global (correct, total); total 0: nothing gradable."""
        from lit_heads.data import is_checkable, is_correct

        # Examples without an answer (plain prompt/response data) cannot be graded, only shown.
        examples = [e for e in datamodule.generation_examples(n, split) if is_checkable(e)]
        world, rank = self.trainer.world_size if self._trainer else 1, self.global_rank
        mine = examples[rank::world]
        answers = self.generate([datamodule.render_prompt_ids(e) for e in mine]) if mine else []
        ok = [is_correct(e, a) for e, a in zip(mine, answers)]
        counts = torch.tensor([sum(ok), len(ok)], device=self.device)
        if world > 1:
            counts = self.all_gather(counts).sum(0)
        rows = [[_short(e.prompt), a, str(e.answer), str(k)] for e, a, k in zip(mine, answers, ok)]
        return int(counts[0]), int(counts[1]), rows

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], batch_size: int = 16) -> list[str]:
        """Greedy continuation of token-id prompts, decoded without special tokens."""
        pad = self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding keeps every prompt's last token at the same position for batched decoding.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.hparams.max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            )
            out += self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        self.model.train(was_training)
        return [text.strip() for text in out]

    def _log_samples(self, rows: list[list[str]], key: str = "val/samples") -> None:
        if not rows or self.global_rank != 0:
            return
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                try:
                    logger.log_text(key=key, columns=["prompt", "generated", "answer", "correct"], data=rows,
                                    step=self.global_step)
                except Exception as err:  # a logging failure must never stop training
                    rank_zero_info(f"lit_heads: could not log sample table: {err}")

    # ---- optimization ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- export ---------------------------------------------------------------------------
    def export_hf(self, directory: str | Path) -> Path:
        """Write the model and tokenizer in Hugging Face format, atomically (temp dir, then rename)."""
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return Path(directory)


def _short(prompt, limit: int = 200) -> str:
    text = prompt if isinstance(prompt, str) else " | ".join(m.get("content", "") for m in prompt)
    return text if len(text) <= limit else text[: limit - 1] + "…"
