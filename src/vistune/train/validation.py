"""A held-out set per stage and its loss during training.

The set is `data.val_path` (a file in the training data's format, images under the same folder) or a
seeded random `data.val_fraction` of the training file, taken out of training. Its loss is the mean
over all its supervised tokens (the training loss's definition), computed on every process's share of
it and summed, every `val_every` steps and after the last one.
"""

from __future__ import annotations

import random
from functools import partial

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from vistune.config import StageConfig
from vistune.data.batch import collate
from vistune.data.dataset import SupervisedDataset
from vistune.data.records import Problems, Sample, load_samples
from vistune.errors import DataError
from vistune.train.distributed import ShardedBatchSampler


def split_validation(stage: StageConfig, samples: list[Sample], problems: Problems
                     ) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples); the latter empty when the stage has no held-out set."""
    data = stage.data
    if data.val_path is not None:
        return samples, load_samples(data.val_path, data.image_folder, data.on_bad_sample == "skip", problems)
    if data.val_fraction is None:
        return samples, []
    n_val = max(1, round(len(samples) * data.val_fraction))
    if n_val >= len(samples):
        raise DataError(f"data.val_fraction={data.val_fraction} of {len(samples)} samples leaves none to train on")
    held = set(random.Random(stage.seed).sample(range(len(samples)), n_val))
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


class _InOrder:
    """Consecutive micro-batches over the held-out set (no shuffling: the same batches every time)."""

    def __init__(self, n: int, micro_batch_size: int) -> None:
        self.n, self.size = n, micro_batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        return [list(range(i, min(i + self.size, self.n))) for i in range(0, self.n, self.size)]


class Validator:
    """The held-out loss. Every process runs as many micro-batches (up to world-1 trailing ones are left
    out, as in training), since a sharded model's forward is a collective."""

    def __init__(self, dataset: SupervisedDataset, micro_batch_size: int, pad_token_id: int, rank: int, world: int,
                 every: int, loss_chunk_size: int | None) -> None:
        sampler = ShardedBatchSampler(_InOrder(len(dataset), micro_batch_size), rank, world)
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, pad_token_id=pad_token_id))
        self.every = every
        self.loss_chunk_size = loss_chunk_size

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, accelerator: Accelerator) -> float:
        """Mean loss per supervised token over the held-out set (all processes)."""
        device = accelerator.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, supervised tokens]
        model.eval()
        for batch, _ in self.loader:
            if batch is None:  # every sample of it skipped
                continue
            n = batch.supervised_tokens()
            extra = {"loss_chunk_size": self.loss_chunk_size} if self.loss_chunk_size is not None else {}
            with accelerator.autocast():
                out = model(**batch.to(device).model_inputs(), num_items_in_batch=max(n, 1), use_cache=False, **extra)
            totals += torch.stack([out.loss.detach().double() * n, torch.tensor(float(n), device=device,
                                                                                   dtype=torch.float64)])
        model.train()
        loss_sum, tokens = accelerator.reduce(totals, "sum").tolist()
        return loss_sum / max(tokens, 1.0)
