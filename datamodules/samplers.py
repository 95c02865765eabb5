"""A training DataLoader that resumes mid-epoch.

Lightning 2.6 saves `state_dict()` of a training dataloader that has one (the fit loop's
"combined_loader" entry of the checkpoint) and calls `load_state_dict()` on resume, before it
iterates again. A plain DataLoader has neither, so a run resumed mid-epoch would start the epoch
over (Lightning only warns). This one records how many batches it handed out in the current
epoch and, after a resume, skips that many by index (nothing is loaded or collated), so the
resumed run sees exactly the batches the uninterrupted run would have seen.

Lightning does not prefetch from a loader with a length, so "handed out" = "trained on" when
ModelCheckpoint saves at the end of a training batch.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

from torch.utils.data import BatchSampler, DataLoader, Sampler


class SkippableBatchSampler(Sampler[list[int]]):
    """Batches of `sampler`; `skip` drops the first N batches of the next pass only."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False):
        self.sampler = sampler  # Lightning calls set_epoch on `loader.batch_sampler.sampler`
        # BatchSampler's attributes: Lightning's DeepSpeed strategy reads `batch_sampler.batch_size`
        # (its train_micro_batch_size_per_gpu), and its loader re-instantiation reads all three.
        self.batch_size, self.drop_last = batch_size, drop_last
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)


class ResumableDataLoader(DataLoader):
    """`DataLoader(dataset, batch_size, sampler=..., ...)` whose position within the epoch is part of
    Lightning checkpoints. The sampler should be seeded and expose `epoch` (DistributedSampler and
    the repository's pair samplers do), so that an epoch's order is a function of (seed, epoch)."""

    def __init__(self, dataset, batch_size: int, sampler: Sampler, drop_last: bool = False, **kwargs: Any):
        super().__init__(dataset, batch_sampler=SkippableBatchSampler(sampler, batch_size, drop_last), **kwargs)
        self._position = {"epoch": self._epoch(), "batches": 0}
        self._pending: Optional[dict] = None

    def _epoch(self) -> Optional[int]:
        return getattr(self.batch_sampler.sampler, "epoch", None)

    def __iter__(self):
        # A generator: the body runs at the first `next()`, after Lightning's `set_epoch`.
        epoch = self._epoch()
        skip = 0
        if self._pending is not None and self._pending["epoch"] == epoch:
            skip = int(self._pending["batches"])
        self._pending = None
        self.batch_sampler.skip = skip
        self._position = {"epoch": epoch, "batches": skip}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
