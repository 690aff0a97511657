"""The study's model and the three things every stage does with it: restart from the base weights,
train for a number of steps, and measure (patterns on two disjoint halves, accuracy of greedy answers)."""

from __future__ import annotations

import gc
import time
from functools import partial

import lightning as L
import torch

from lit_heads.analysis.study.config import StudyConfig, resolve_device
from lit_heads.data.records import Example
from lit_heads.errors import DataError


def trainer_device(device: torch.device) -> dict:
    """Lightning's accelerator and devices arguments for one torch device."""
    return {"accelerator": device.type, "devices": [device.index] if device.index is not None else 1}


class StudyRunner:
    """The model, its base weights and the training/measuring primitives every stage uses. The model is
    loaded once; every arm restarts from a CPU copy of the base weights, far cheaper than reloading."""

    def __init__(self, cfg: StudyConfig):
        from lit_heads.data import SFTDataModule
        from lit_heads.heads import find_heads
        from lit_heads.module import SFTModule

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.module = SFTModule(cfg.model, num_generate=0, max_new_tokens=cfg.max_new_tokens)
        self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.model.state_dict().items()}
        self.module.to(self.device)
        self.data = SFTDataModule(tokenizer=self.module.tokenizer, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                  seed=cfg.seed)
        self.ap_data = SFTDataModule(tokenizer=self.module.tokenizer, max_length=cfg.max_length,
                                     batch_size=cfg.ap_batch_size)
        layout = find_heads(self.module.model)
        self.n_layers, self.n_heads = layout.n_layers, layout.n_heads
        # A hub model's heads are known only now (`config.model_shape` reads local configs before loading).
        cfg.check_heads(str(cfg.model), self.n_layers * self.n_heads)
        # What the weights are now: 'base' after reset, else the label of the last training run.
        self.state: str | None = "base"

    def reset(self) -> None:
        self.module.model.load_state_dict(self.base_state)
        self.state = "base"

    def train(self, examples: list[Example], steps: int, seed: int, lr: float | None = None,
              callbacks: list | None = None, data=None, label: str | None = None) -> float:
        """`steps` AdamW steps (warmup + cosine) on `examples`, reshuffled every pass; returns seconds.
        `label` names the model this makes (`state`), for a later stage that needs exactly that model."""
        from lit_heads.optim import WarmupCosine

        if not examples:
            raise DataError("A training run got no examples.")
        data = data or self.data
        L.seed_everything(seed, verbose=False)
        data.seed = seed  # the loader's shuffle generator is seeded from the datamodule
        loader = data.make_dataloader(examples, shuffle=True)
        # Fused: one pass over the weights instead of a dozen; a Gemma 3 270M step on 2 CPU cores spent
        # 1.6 s in AdamW's update, 0.3 s fused (same update up to rounding).
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.module.optimizer_factory = partial(torch.optim.AdamW, lr=lr or self.cfg.lr, weight_decay=0.01, **fused)
        warmup = min(self.cfg.warmup_steps, max(steps - 1, 0))
        self.module.scheduler_factory = partial(WarmupCosine, warmup_steps=warmup)
        trainer = L.Trainer(
            **trainer_device(self.device), max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=self.cfg.progress_bar, gradient_clip_val=1.0,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks or [],
        )
        started = time.perf_counter()
        self.state = None
        trainer.fit(self.module, train_dataloaders=loader)
        self.state = label
        # Lightning's teardown moves the module to the CPU; scoring and generation run on the study's device.
        self.module.to(self.device)
        # Free this run's trainer and AdamW state now. The trainer, its strategy and its optimizers
        # reference each other, and Python's cycle collector frees such groups only now and then: each
        # run's optimizer state (twice the model) piled up, about 1 GB a run for SmolLM2, until the
        # default study ran out of 24 GB in its application stage.
        self.module.trainer = None
        del trainer
        gc.collect()
        return time.perf_counter() - started

    def halves(self, examples: list[Example], data=None) -> dict[str, torch.Tensor]:
        """Patterns of two disjoint halves of `examples` (even and odd positions) and of all of them."""
        from lit_heads.heads.scoring import compute_ap

        data = data or self.ap_data
        a, b = examples[0::2], examples[1::2]
        pa = compute_ap(self.module.model, data.make_dataloader(a), progress=False).scores
        pb = compute_ap(self.module.model, data.make_dataloader(b), progress=False).scores
        # AP is a per-sample mean, so the whole set's AP is the size-weighted mean of the halves'.
        full = (pa * len(a) + pb * len(b)) / len(examples)
        return {"a": pa, "b": pb, "full": full}

    def accuracy(self, examples: list[Example]) -> float:
        """Share of greedy answers the task's checker accepts."""
        from lit_heads.data import is_correct

        answers = self.module.generate([self.data.render_prompt_ids(e) for e in examples],
                                       batch_size=self.cfg.gen_batch_size)
        return sum(is_correct(e, a) for e, a in zip(examples, answers)) / len(examples)
