"""What goes into the model: one tokenized sample (`Example`), a padded or packed `Batch`, and the one
padding shared by training (right padding) and generation (left padding, so every prompt ends where its
reply begins)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import torch

from vistune.tokens import IGNORE_INDEX

Side = Literal["right", "left"]


@dataclass(frozen=True)
class Example:
    """One sample ready to batch: what `SupervisedDataset` yields, or a prompt to generate from."""

    id: str
    input_ids: torch.Tensor  # [T], image slots expanded to IMAGE_TOKEN_ID runs
    labels: torch.Tensor | None  # [T], IGNORE_INDEX where unsupervised; None for a prompt
    pixel_values: torch.Tensor | None  # [n_tiles, 3, H, W] or None (n_tiles = n_images in `single`)
    image_sizes: torch.Tensor | None  # [n_images, 2] (height, width) in `hd`/`anyres`, else None


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample that could not be used; the collator drops it and the loop counts it."""

    id: str
    reason: str
    message: str


@dataclass(frozen=True)
class Batch:
    """The model's inputs for a micro-batch. Padded rows (`collate`) have an attention mask; packed rows
    (`train.packing`) have none and mark their samples' boundaries by position ids restarting at 0."""

    ids: list[str]  # the samples in it, in order (packed: several per row)
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor | None  # [B, T]; None for prompts to generate from
    attention_mask: torch.Tensor | None  # [B, T], 1 on tokens, 0 on padding; None when packed
    pixel_values: torch.Tensor | None  # [N_tiles, 3, H, W], the samples' images in order; None without images
    image_sizes: torch.Tensor | None  # [N_images, 2] (height, width); None in `single`
    num_tokens: int  # tokens attended (text + image slots, no padding)
    position_ids: torch.Tensor | None = None  # [B, T], packed rows only
    flash_kwargs: dict[str, torch.Tensor | int] = field(default_factory=dict)  # flattened rows' bounds

    def supervised_tokens(self) -> int:
        """Tokens that are predicted (a label after the first position): the loss's denominator."""
        return 0 if self.labels is None else int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        """The tensors on `device`; `image_sizes` stays on the host, where the layout reads it as numbers."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return replace(self, input_ids=self.input_ids.to(device), labels=move(self.labels),
                       attention_mask=move(self.attention_mask), pixel_values=move(self.pixel_values),
                       position_ids=move(self.position_ids),
                       flash_kwargs={k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in self.flash_kwargs.items()})

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with `pin_memory=True`: the tensors in page-locked memory (faster copies
        to the GPU)."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()
        return replace(self, input_ids=self.input_ids.pin_memory(), labels=pin(self.labels),
                       attention_mask=pin(self.attention_mask), pixel_values=pin(self.pixel_values),
                       image_sizes=pin(self.image_sizes), position_ids=pin(self.position_ids))

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model's `forward` / `generate`; labels and packing fields only when set."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                                  "pixel_values": self.pixel_values, "image_sizes": self.image_sizes}
        if self.labels is not None:
            inputs["labels"] = self.labels
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs | self.flash_kwargs


class Collated(NamedTuple):
    """A loader's micro-batch: the batch of the usable samples (None when all were skipped) and the
    skipped ones, for counting."""

    batch: Batch | None
    skipped: list[Skipped]


def pad(rows: Sequence[torch.Tensor], value: int, side: Side = "right") -> torch.Tensor:
    """1-D rows of different lengths -> [B, T] (T the longest), filled with `value` on the right (training:
    every sample starts at position 0) or on the left (generation: every prompt ends at the last column)."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0 if side == "right" else length - len(r)
        out[i, at: at + len(r)] = r
    return out


def concat(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The samples' image tensors joined in order; None when none has any."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


def padded(examples: Sequence[Example], pad_token_id: int, side: Side = "right") -> Batch:
    """The examples padded to one length (see `pad`), labels with IGNORE_INDEX (prompts have none)."""
    rows = [e.input_ids for e in examples]
    mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], 0, side)
    labels = [e.labels for e in examples if e.labels is not None]
    return Batch(ids=[e.id for e in examples], input_ids=pad(rows, pad_token_id, side),
                 labels=pad(labels, IGNORE_INDEX, side) if len(labels) == len(examples) else None,
                 attention_mask=mask, pixel_values=concat([e.pixel_values for e in examples]),
                 image_sizes=concat([e.image_sizes for e in examples]), num_tokens=int(mask.sum()))


def split_skipped(items: Sequence[Example | Skipped]) -> tuple[list[Example], list[Skipped]]:
    """(the usable examples, the skipped stand-ins), each in order."""
    return ([it for it in items if isinstance(it, Example)], [it for it in items if isinstance(it, Skipped)])


def collate(items: Sequence[Example | Skipped], pad_token_id: int, padding_side: Side = "right") -> Collated:
    """The DataLoader's collate: pad the usable examples into a batch; pass the skipped ones beside it."""
    kept, skipped = split_skipped(items)
    return Collated(padded(kept, pad_token_id, padding_side) if kept else None, skipped)
