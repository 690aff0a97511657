"""Training throughput in samples and tokens per second, from Lightning's `ThroughputMonitor`."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_samples(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    """Real tokens of an SFT batch (prompt and response, padding excluded)."""
    return int(batch["attention_mask"].sum())


class TokenThroughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` (aware of the world size; the time spent in validation is not
    counted as training time) over SFT batches: a sample is a row, an item is a real token.

    It logs, every `log_every_n_steps` once `window_size` batches were seen,
    `train/device/samples_per_sec` and `train/device/items_per_sec` (tokens/s of one device), and with
    more than one device `train/samples_per_sec` and `train/items_per_sec` (all devices), besides
    running totals (`train/time`, `train/samples`, `train/lengths` = tokens). Validation and test runs
    get the same keys under `validate/` and `test/`.
    """

    def __init__(self, window_size: int | None = None):
        """
        Args:
            window_size: batches in the rolling window a rate is measured over (at least 2); default
                `log_every_n_steps + 1`, so that each logged rate covers the steps since the last one.
        """
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_tokens)
        self.window_size = window_size

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.kwargs["window_size"] = self.window_size or max(2, trainer.log_every_n_steps + 1)
        super().setup(trainer, pl_module, stage)
