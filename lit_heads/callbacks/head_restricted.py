"""Head-restricted SFT: train only selected attention heads, exactly, as deltas next to frozen weights.

Add to a fit config (see configs/head_restricted.yaml):

    trainer:
      callbacks:
        - class_path: lit_heads.callbacks.head_restricted.HeadRestrictedFinetuning
          init_args: {strategy: top, fraction: 0.1, kv: group}

What happens, and when (Lightning 2.6 order of a fit):

1. ``setup`` (after the DataModule's setup, before the checkpoint is restored and before
   ``configure_optimizers``; for validate/test too, so their ``ckpt_path`` loads): the heads are
   selected — by default ranked by the activation pattern (AP) of the base model on the first
   ``n_score_samples`` training examples, each DDP rank scoring
   its share and ``compute_ap`` all-reducing them — and ``HeadRestriction.apply()`` freezes the
   model and attaches zero-initialised per-head deltas (``lit_heads.heads.restrict``). The module's
   ``configure_optimizers`` hands the optimizer only parameters with ``requires_grad``, i.e. the
   deltas: frozen tensors get neither gradients nor optimizer state, and AdamW's weight decay can
   only pull the *change* toward zero.
2. The selection is logged once the checkpoint (if any) has been checked against it, at fit (or
   validate/test) start: ``<dirpath>/selection.json`` (heads, options, exact counts, the AP used
   to rank), ``<dirpath>/selection_mask.png`` (layer x head 0/1 heatmap), and the loggers' image
   and table (W&B); a resumed run rewrites the files but does not log the selection again.
3. Checkpoints hold the deltas (parametrized weight names) and this callback's state (heads and
   options). On resume (``ckpt_path``) Lightning calls ``setup`` *before* it loads the checkpoint,
   so the selection is recomputed there from the same config (deterministic: the base model, data
   and seed are the same) and the checkpoint is checked against it: a checkpoint made with other
   heads or options is refused with a clear error, before any file of the run is written, instead
   of silently training other heads (``lit_heads fit`` compares the options even before the model
   loads, see ``resume_differences``). A ``top_k`` larger than the model's head count is refused
   before any sample is scored.
4. ``on_fit_end`` (and ``merge_for_export``, which ``ExportHF`` calls first) folds the deltas into
   the weights: the model is a plain Hugging Face model again and exports in plain HF format.
   ``lit_heads.models.load_model("run.ckpt")`` merges a checkpoint's deltas the same way.

GQA policy (``kv``): ``group`` also trains the key/value rows of every KV group that contains a
selected query head (shared with that group's unselected heads, counted once per group); ``none``
keeps keys and values frozen, so only the selected heads' q rows and o columns train.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_heads.atomic import atomic_write_text
from lit_heads.errors import ConfigError
from lit_heads.heads.layout import find_heads
from lit_heads.heads.pattern import Pattern, heatmap
from lit_heads.heads.restrict import CHECKPOINT_STATE_KEY, KV_POLICIES, HeadRestriction
from lit_heads.heads.selection import check_selection_options, heads_to_mask, load_head_list, select_heads
from lit_heads.run_folder import HEADS, output_dir

DEFAULT_FRACTION = 0.1


class HeadRestrictedFinetuning(L.Callback):
    """Train only the selected attention heads (q rows, o columns, and K/V rows per ``kv``); every
    other weight stays bit-identical. See the module docstring for the order of events."""

    def __init__(
        self,
        strategy: str = "top",
        top_k: int | None = None,
        fraction: float | None = None,
        scores: str | None = None,
        heads: str | None = None,
        n_score_samples: int = 32,
        kv: str = "group",
        train_norms: bool = False,
        train_mlp: bool = False,
        seed: int = 0,
        dirpath: str | None = None,
    ):
        """
        Args:
            strategy: how heads are chosen: 'top' (highest AP), 'bottom' (lowest AP, a control),
                'random' (seeded, a control) or 'list' (the heads in the `heads` file).
            top_k: number of heads to train (top/bottom/random). Give top_k or fraction, not both.
            fraction: share of all heads to train (top/bottom/random); default 0.1 when top_k is
                not set. The count is max(1, round(fraction * layers * heads)).
            scores: pattern file (.safetensors from `lit_heads ap`, or an L x H .npy) to rank heads
                by (top/bottom). Default: the AP of the base model on the training data, computed
                at fit start.
            heads: head list file for strategy 'list': .npy [K, 2] (LoFiT), .json, .txt or .csv
                of (layer, head) pairs, 0-based.
            n_score_samples: training examples scored for the AP ranking (when `scores` is unset).
            kv: GQA key/value policy: 'group' trains the K/V rows of each KV group holding a
                selected head (shared with the group's other query heads); 'none' freezes K/V.
            train_norms: also train every normalisation layer, whole.
            train_mlp: also train every MLP block, whole.
            seed: seed of strategy 'random'.
            dirpath: where selection.json and selection_mask.png go; default `<trainer.default_root_dir>/heads`.
        """
        if kv not in KV_POLICIES:
            raise ConfigError(
                f"HeadRestrictedFinetuning: unknown kv policy {kv!r}. Use 'group' (train the K/V rows "
                "of each KV group that holds a selected head) or 'none' (keys and values stay frozen)."
            )
        if strategy != "list" and heads is None and top_k is None and fraction is None:
            fraction = DEFAULT_FRACTION
        # The count's upper bound needs the model: it is checked again in setup, before any scoring.
        top_k, fraction = _checked(check_selection_options, strategy, top_k=top_k, fraction=fraction,
                                   has_heads=heads is not None)
        if scores is not None and strategy not in ("top", "bottom"):
            raise ConfigError(
                f"HeadRestrictedFinetuning: `scores` ranks heads for strategy top/bottom, but strategy is "
                f"{strategy!r}, which does not use scores. Drop `scores` or use strategy top/bottom."
            )
        if scores is not None and not Path(scores).is_file():
            raise ConfigError(f"HeadRestrictedFinetuning: scores file {scores} does not exist. Give a pattern written "
                              "by `lit_heads ap` (.safetensors) or an L x H .npy.")
        if n_score_samples < 1:
            raise ConfigError(f"HeadRestrictedFinetuning: n_score_samples must be >= 1, got {n_score_samples}.")
        self.strategy, self.top_k, self.fraction = strategy, top_k, fraction
        self.scores_path, self.heads_path = scores, heads
        self.n_score_samples, self.kv, self.seed = n_score_samples, kv, seed
        self.train_norms, self.train_mlp, self.dirpath = train_norms, train_mlp, dirpath
        # Read now, so a bad file fails before the model is loaded.
        self._listed = load_head_list(heads) if heads is not None else None
        self.restriction: HeadRestriction | None = None
        self.selected: list[tuple[int, int]] = []
        self.ranking_scores: torch.Tensor | None = None
        self.summary: dict = {}
        self._pending_log = False
        self._restored = False
        self._out_dir: Path | None = None

    # ---- selection and restriction -----------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        # validate/test too: a checkpoint of a restricted fit (`--ckpt_path`) holds deltas, and
        # Lightning loads it after this hook, so the same restriction must be in place by then.
        if stage not in ("fit", "validate", "test") or (self.restriction is not None and self.restriction.applied):
            return
        self._out_dir = output_dir(trainer, self.dirpath, HEADS)
        model = pl_module.model
        layout = find_heads(model)
        # Before any sample is scored: a top_k larger than the model's head count fails here.
        _checked(check_selection_options, self.strategy, top_k=self.top_k, fraction=self.fraction,
                 has_heads=self._listed is not None, n_layers=layout.n_layers, n_heads=layout.n_heads)
        self.ranking_scores = self._ranking_scores(trainer, pl_module, layout)
        heads = select_heads(
            self.strategy, layout.n_layers, layout.n_heads, top_k=self.top_k, fraction=self.fraction,
            scores=self.ranking_scores, heads=self._listed, seed=self.seed,
        )
        # All-reduced AP is identical on every rank; the broadcast makes that a guarantee, since a
        # rank training other heads would desynchronise DDP without any error.
        self.selected = [tuple(h) for h in trainer.strategy.broadcast(heads, src=0)]
        self.restriction = HeadRestriction(
            model, self.selected, kv=self.kv, train_norms=self.train_norms, train_mlp=self.train_mlp
        ).apply()
        described = self.restriction.describe()
        self.summary = {
            **self._options(), "heads": [list(h) for h in self.selected], "n_selected": len(self.selected),
            "n_layers": layout.n_layers, "n_heads": layout.n_heads, "kv_groups": described["kv_groups"],
            "trainable": described["trainable"], "by_kind": described["by_kind"], "total": described["total"],
            "trainable_fraction": described["fraction"],
        }
        rank_zero_info(format_selection(self.summary))
        # Written once the checkpoint (if any) has been checked against this selection: a refused
        # resume must leave the run's selection files and metrics as they were.
        self._pending_log = True

    # Lightning restores a checkpoint (and load_state_dict refuses other heads) after setup and
    # before these hooks.
    def on_fit_start(self, trainer, pl_module):
        self._write_selection(trainer)

    def on_validation_start(self, trainer, pl_module):
        self._write_selection(trainer)

    def on_test_start(self, trainer, pl_module):
        self._write_selection(trainer)

    def _write_selection(self, trainer) -> None:
        if not self._pending_log:
            return
        self._pending_log = False
        if trainer.is_global_zero:
            layout = (self.summary["n_layers"], self.summary["n_heads"])
            # A resumed run's loggers already hold the selection (step 0) from its first part.
            self._log_selection(trainer, self._out_dir, *layout, to_loggers=not self._restored)

    def _ranking_scores(self, trainer, pl_module, layout) -> torch.Tensor | None:
        if self.strategy not in ("top", "bottom"):
            return None
        if self.scores_path is not None:
            path = Path(self.scores_path)
            pattern = Pattern.from_npy(path) if path.suffix.lower() == ".npy" else Pattern.load(path)
            return pattern.check_shape(layout.n_layers, layout.n_heads).scores
        from lit_heads.heads.scoring import compute_ap
        from lit_heads.module import loss_chunk_size

        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "train_examples", None):
            raise ConfigError(
                "HeadRestrictedFinetuning ranks heads by their activation pattern on the training data, "
                "but the fit has no SFTDataModule with training examples. Use a `data:` section, or give "
                "`scores` (a pattern file) or strategy random/list."
            )
        examples = datamodule.train_examples[: self.n_score_samples]
        mine = examples[trainer.global_rank :: trainer.world_size]  # compute_ap all-reduces the shares
        pattern = compute_ap(
            pl_module.model, datamodule.make_dataloader(mine) if mine else [],
            device=trainer.strategy.root_device, progress=trainer.is_global_zero,
            loss_chunk_size=loss_chunk_size(pl_module),
        )
        return pattern.scores

    def _options(self) -> dict:
        return {
            "strategy": self.strategy, "top_k": self.top_k, "fraction": self.fraction, "scores": self.scores_path,
            "heads_file": self.heads_path, "n_score_samples": self.n_score_samples, "kv": self.kv,
            "train_norms": self.train_norms, "train_mlp": self.train_mlp, "seed": self.seed,
        }

    def _log_selection(self, trainer, out_dir: Path, n_layers: int, n_heads: int, to_loggers: bool = True) -> None:
        record = dict(self.summary)
        if self.ranking_scores is not None:
            record["ranking_scores"] = self.ranking_scores.tolist()
        path = out_dir / "selection.json"
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        mask = heads_to_mask(self.selected, n_layers, n_heads).float()
        image = heatmap(mask, out_dir / "selection_mask.png",
                        title=f"trained heads: {self.strategy}, {len(self.selected)} of {n_layers * n_heads}")
        rows = [[l, h, float(self.ranking_scores[l, h]) if self.ranking_scores is not None else None]
                for l, h in self.selected]
        for logger in trainer.loggers if to_loggers else ():
            logger.log_metrics({"heads/trainable_params": float(self.summary["trainable"]),
                                "heads/n_selected": float(len(self.selected))}, step=0)
            if hasattr(logger, "log_image"):
                logger.log_image(key="heads/selection_mask", images=[str(image)], step=0)
            if hasattr(logger, "log_table"):
                logger.log_table(key="heads/selection", columns=["layer", "head", "score"], data=rows, step=0)
        rank_zero_info(f"lit_heads: head selection written to {path}")

    # ---- merge ---------------------------------------------------------------------------------
    def merge_for_export(self, pl_module) -> None:
        """Fold the deltas into the weights (idempotent): afterwards the model is plain HF."""
        if self.restriction is not None and self.restriction.applied:
            self.restriction.merge()

    def on_fit_end(self, trainer, pl_module):
        # After every checkpoint of the fit (ModelCheckpoint saves in on_train_end at the latest),
        # so checkpoints keep the deltas that their optimizer state refers to.
        self.merge_for_export(pl_module)

    # ---- checkpoint state ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return CHECKPOINT_STATE_KEY  # where lit_heads.heads.restrict.restriction_from_checkpoint looks

    def state_dict(self) -> dict:
        return {**self._options(), "heads": [list(h) for h in self.selected]}

    def resume_differences(self, saved: dict) -> list[str]:
        """The options of this callback that differ from a checkpoint's saved state, as
        'name: saved -> now' lines (the CLI checks them before the model loads)."""
        mine = self._options()
        return [f"head selection {k}: {saved[k]!r} in the checkpoint, {v!r} now"
                for k, v in mine.items() if k in saved and saved[k] != v]

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning loads this after setup() applied the restriction and after the model weights
        # (whose delta indices HeadDelta already checked); compare the rest of the setup too.
        saved = [tuple(h) for h in state_dict.get("heads", [])]
        mismatch = {k: (state_dict.get(k), v) for k, v in (("kv", self.kv), ("train_norms", self.train_norms),
                                                           ("train_mlp", self.train_mlp)) if state_dict.get(k) != v}
        if self.selected and (saved != self.selected or mismatch):
            raise ConfigError(
                f"The checkpoint was trained on heads {saved} ({_fmt_opts(state_dict)}), but this fit selected "
                f"{self.selected} ({_fmt_opts(self._options())}). Resume with the config the checkpoint was "
                "trained with (same strategy, size, scores, seed, kv, train_norms and train_mlp), or save its "
                "heads with `lit_heads.heads.selection.save_head_list` and use strategy 'list'."
            )
        self._restored = True


def _checked(check, *args, **kwargs):
    """Run a check of lit_heads.heads.selection, naming this callback in its message."""
    try:
        return check(*args, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"HeadRestrictedFinetuning: {err}") from None


def format_selection(s: dict) -> str:
    kinds = ", ".join(f"{k} {n:,}" for k, n in s["by_kind"].items() if n)
    size = (f"top_k={s['top_k']}" if s["top_k"] is not None
            else (f"fraction={s['fraction']}" if s["fraction"] is not None else "listed"))
    return (
        f"lit_heads: head-restricted SFT: {s['n_selected']} of {s['n_layers'] * s['n_heads']} heads "
        f"(strategy {s['strategy']}, {size}), kv={s['kv']} ({s['kv_groups']} KV groups)\n"
        f"lit_heads: trained scalars {s['trainable']:,} = {100 * s['trainable_fraction']:.3f}% of {s['total']:,} "
        f"({kinds}); heads: {' '.join(f'{l}.{h}' for l, h in s['heads'])}"
    )


def _fmt_opts(o: dict) -> str:
    return ", ".join(f"{k}={o.get(k)!r}" for k in ("strategy", "top_k", "fraction", "seed", "kv", "train_norms",
                                                   "train_mlp"))
