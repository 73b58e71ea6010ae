"""Batches of similar length, image and text-only samples apart (LLaVA's group_by_modality_length).

Padding wastes compute in proportion to the spread of lengths within a batch, so samples are
shuffled, cut into mega-batches, sorted by length within each, and cut into batches; the batch order
is then shuffled. Image and text-only samples are grouped separately, as LLaVA does, and only the
two remainders may share a batch. The order is a pure function of (seed, epoch), so a resumed run
skips exactly the batches it already trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """An epoch's batches as a pure function of (seed, epoch), computed once per epoch; iteration starts
    after the `skip` batches a resumed run already trained. Subclasses say how batches are made."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order (computed once per epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._make(random.Random(self.seed * 100_003 + epoch)))
        return self._cached[1]

    def _make(self, rng: random.Random) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.skip


class GroupedBatchSampler(EpochBatchSampler):
    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True,
                 mega_batch_factor: int = 50) -> None:
        super().__init__(seed)
        self.lengths = lengths
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.mega = batch_size * mega_batch_factor

    def _make(self, rng: random.Random) -> list[list[int]]:
        if not self.group_by_length:
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        full: list[list[int]] = []
        remainders: list[int] = []
        for modality in (1, -1):
            idx = [i for i, n in enumerate(self.lengths) if (n >= 0) == (modality == 1)]
            rng.shuffle(idx)
            for m in range(0, len(idx), self.mega):
                group = sorted(idx[m: m + self.mega], key=lambda i: -abs(self.lengths[i]))
                for b in range(0, len(group), self.batch_size):
                    chunk = group[b: b + self.batch_size]
                    (full.append(chunk) if len(chunk) == self.batch_size else remainders.extend(chunk))
        rng.shuffle(full)
        tail = [remainders[i: i + self.batch_size] for i in range(0, len(remainders), self.batch_size)]
        return full + tail
