"""A train loader that resumes mid-epoch exactly where a killed run stopped.

Lightning restores a train loader's position only when the loader object is *stateful*
(`state_dict`/`load_state_dict`); a plain `DataLoader(shuffle=True, generator=...)` restarts the
epoch from its first batch on resume, so a resumed run trains on other batches than an
uninterrupted one. And a seeded `torch.Generator` inside the loader advances every epoch, so after a
resume in epoch e > 0 a fresh loader would replay epoch 0's order.

- `ResumableRandomSampler(data, seed)`: the order of epoch e is `randperm` with a generator seeded
  `seed + e` (DistributedSampler's rule), e set by Lightning through `set_epoch` from the restored
  epoch count. (The orders differ from the old `DataLoader(shuffle=True, generator=...)`, whose
  generator state also depended on how far each pass was consumed.) Under DDP Lightning swaps it
  for its `DistributedSampler` (it is a `RandomSampler`), as it does for `shuffle=True`.
- `ResumableDataLoader`: a `DataLoader` that counts the batches it has handed out in the current
  epoch; its state `{"epoch", "batches"}` goes into every checkpoint (Lightning's `_Stateful`
  loader protocol) and, loaded back, makes the next pass of the same epoch skip those batches.
  Lightning does not prefetch from a loader with a length, so "handed out" is exactly "trained on"
  when the checkpoint is written at a batch end.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["ResumableDataLoader", "ResumableRandomSampler"]


class ResumableRandomSampler(RandomSampler):
    """A shuffling sampler whose epoch-e order is a function of (seed, e) only."""

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # A fresh generator per pass, seeded from (seed, epoch) as DistributedSampler does: no state
        # carries over between passes, so a resumed run draws the same order for the same epoch.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def _sampler_epoch(loader: DataLoader) -> int | None:
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    epoch = getattr(sampler, "epoch", None)
    return int(epoch) if epoch is not None else None


class ResumableDataLoader(DataLoader):
    """`DataLoader` with a mid-epoch position in its state dict (see the module docstring)."""

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing (epoch, skip) is decided before the first batch is requested, i.e.
        # after Lightning has restored the loop, called set_epoch and loaded this loader's state.
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = _sampler_epoch(self)
        pending, self._pending_state = getattr(self, "_pending_state", None), None
        skip = 0
        if pending is not None and pending.get("epoch") == epoch:
            skip = int(pending.get("batches", 0))
            if not 0 < skip < len(self):  # a finished epoch starts the next one from its start
                skip = 0
        self._epoch, self._batches = epoch, skip
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": getattr(self, "_epoch", None), "batches": getattr(self, "_batches", 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
