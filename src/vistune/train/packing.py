"""Sequence packing with images: several samples per row, attention never crossing a sample boundary.

A packed row is the samples' token ids laid end to end (each sample's IMAGE_TOKEN_ID run stays inside
it, and its images are concatenated in row order, so `VisionLanguageModel.embed`'s masked_scatter puts
every image's features into its own sample). Position ids restart at 0 for every sample, and the
batch is given to the LLM with `attention_mask=None`: transformers (5.x, `masking_utils`) then reads the
sample boundaries from the position ids, building a block-diagonal causal mask for SDPA/eager
(`find_packed_sequence_indices`) and calling flash-attn's varlen kernel with cu_seqlens for
`flash_attention_2` (`_is_packed_sequence`, one row only, hence `flatten_rows`). This is the route of
transformers' own `DataCollatorWithFlattening`; it needs no attention code of our own.

The loss per token equals unpacked training: the first label of each sample is ignored (unpacked, no
token predicts a sequence's first token; packed, the previous sample's last token would), RoPE sees the
same positions, and the loop divides the summed loss by the number of supervised tokens as before.
The tail of a row is padding: labels ignored, positions restarting at 0, so it is its own "sample"
that nothing attends to.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from vistune.data.batch import Batch, Collated, Example, Skipped, concat, split_skipped
from vistune.data.sampler import EpochBatchSampler
from vistune.tokens import IGNORE_INDEX


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack item positions into bins of at most `capacity` tokens, first-fit decreasing (longest first,
    each into the first bin it fits). Bins keep the input order of their items. An item longer than
    `capacity` gets a bin of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def collate_packed(items: list[Example | Skipped], pad_token_id: int, pack_length: int) -> Collated:
    """Items from SupervisedDataset -> a packed batch: input_ids, labels, position_ids [R, L]; pixel_values
    [N, 3, H, W] in row order; attention_mask None. L is the longest row (at most `pack_length` unless one
    sample alone is longer). `Skipped` items are passed on beside it for counting, as `collate` does."""
    kept, skipped = split_skipped(items)
    if not kept:
        return Collated(None, skipped)
    rows = [[kept[i] for i in row] for row in first_fit([len(e.input_ids) for e in kept], pack_length)]
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at: at + n] = e.input_ids
            labels[r, at: at + n] = e.labels
            labels[r, at] = IGNORE_INDEX  # the previous sample's last token must not predict this one
            positions[r, at: at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(length - at)  # the padded tail: a separate, unsupervised span
        n_tokens += at
    in_order = [e for row in rows for e in row]  # images (and hd/anyres sizes) in row order
    return Collated(Batch(ids=[e.id for e in kept], input_ids=ids, labels=labels, attention_mask=None,
                          pixel_values=concat([e.pixel_values for e in in_order]),
                          image_sizes=concat([e.image_sizes for e in in_order]), num_tokens=n_tokens,
                          position_ids=positions), skipped)


def flatten_rows(batch: Batch) -> Batch:
    """[R, L] -> [1, R*L] for flash-attn varlen, which transformers only detects on a single row
    (boundaries are already marked by the position ids, padding included). The boundaries also go in as
    `flash_kwargs` (cu_seq_lens_q/k [S+1] int32, max_length_q/k as ints), computed once here by
    transformers' own function: given them, its flash-attention path skips recomputing them from the
    position ids in every layer, and a compiled model sees no data-dependent `.max()` there."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    if batch.labels is None or batch.position_ids is None:
        raise ValueError("flatten_rows takes packed training batches (collate_packed)")
    positions = batch.position_ids.reshape(1, -1)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(positions)
    return replace(batch, input_ids=batch.input_ids.reshape(1, -1), labels=batch.labels.reshape(1, -1),
                   position_ids=positions, flash_kwargs={"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k,
                                                         "max_length_q": int(max_q), "max_length_k": int(max_k)})


class PackedBatchSampler(EpochBatchSampler):
    """Micro-batches of `rows` packed rows of at most `pack_length` tokens each.

    Each epoch the samples are shuffled (a pure function of seed and epoch, so resume skips exactly the
    micro-batches done), cut into windows of `rows * window_factor` rows' worth of samples, packed
    first-fit decreasing within the window, and the packed rows grouped `rows` at a time. The collator
    packs the micro-batch again from the exact token counts, so estimated lengths cost only fill rate.
    """

    def __init__(self, lengths: list[int], pack_length: int, rows: int, seed: int, window_factor: int = 16) -> None:
        super().__init__(seed)
        self.lengths = [abs(n) for n in lengths]
        self.pack_length = pack_length
        self.rows = rows
        self.window = rows * window_factor

    def _make(self, rng: random.Random) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        rows: list[list[int]] = []
        start = 0
        while start < len(order):
            # Take samples until they fill about `window` rows, then pack them.
            budget, end = self.window * self.pack_length, start
            while end < len(order) and budget > 0:
                budget -= self.lengths[order[end]]
                end += 1
            chunk = order[start:end]
            rows += [[chunk[i] for i in b] for b in first_fit([self.lengths[i] for i in chunk], self.pack_length)]
            start = end
        return [[i for row in rows[b: b + self.rows] for i in row] for b in range(0, len(rows), self.rows)]
