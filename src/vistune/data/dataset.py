"""The training dataset: samples are checked up front, tokenized and their images loaded lazily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import Dataset
from transformers import BaseImageProcessor

from vistune.chat.encode import ChatEncoder
from vistune.data.records import Sample
from vistune.errors import DataError
from vistune.images import image_size, load_image
from vistune.model.tiling import ImageLayout, ImagePreprocessor
from vistune.tokens import IGNORE_INDEX


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample that could not be used; the collator drops it and the loop counts it."""

    id: str
    reason: str
    message: str


def sample_image_tokens(layout: ImageLayout | None, sample: Sample) -> list[int] | None:
    """Each image's token count for `hd`/`anyres` (they depend on its size); None in `single`."""
    if layout is None or layout.mode == "single":
        return None
    return [layout.num_tokens(*image_size(p, sample.id)) for p in sample.images]


class SupervisedDataset(Dataset):
    """Sample -> {"input_ids", "labels", "pixel_values", "image_sizes", "id"}, or a `Skipped` when skipping
    bad samples. `layout`: the model's image mode (default `single`)."""

    def __init__(self, samples: list[Sample], encoder: ChatEncoder, processor: BaseImageProcessor,
                 image_preprocess: Literal["pad", "processor"], skip_bad: bool,
                 lengths: list[int] | None = None, layout: ImageLayout | None = None) -> None:
        self.samples = samples
        self.exact_lengths = lengths
        self.encoder = encoder
        self.processor = processor
        self.image_preprocess = image_preprocess
        self.skip_bad = skip_bad
        self.layout = layout
        self.images = ImagePreprocessor(layout, processor, image_preprocess)

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        """Token counts (exact after a precheck, else estimated from words), negative for text-only
        samples (the sign keeps modalities apart)."""
        if self.exact_lengths is not None:
            return self.exact_lengths
        n_img = self.encoder.num_image_tokens
        return [(s.n_words + n_img * len(s.images)) * (1 if s.images else -1) for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, object] | Skipped:
        sample = self.samples[index]
        try:
            return self._load(sample)
        except DataError as e:
            if self.skip_bad:
                return Skipped(sample.id, e.reason, str(e))
            raise

    def _load(self, sample: Sample) -> dict[str, object] | Skipped:
        enc = self.encoder.encode(list(sample.messages), sample.id,
                                  image_tokens=sample_image_tokens(self.layout, sample))
        if enc.n_supervised == 0:
            # Always skipped and counted, whatever on_bad_sample says: training on it would teach nothing.
            return Skipped(sample.id, "all reply tokens truncated",
                           f"sample {sample.id}: no reply token fits in model_max_length={self.encoder.max_length}")
        images = [load_image(p, sample.id) for p in sample.images[: enc.n_images]]
        pixel_values, sizes = self.images(images) if images else (None, None)
        return {
            "id": sample.id,
            "input_ids": torch.tensor(enc.input_ids),
            "labels": torch.tensor(enc.labels),
            "pixel_values": pixel_values,  # [n_tiles, 3, H, W] or None (n_tiles = n_images in `single`)
            "image_sizes": sizes,  # [n_images, 2] (height, width) or None
        }


def collate(items: list[dict[str, object] | Skipped], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a batch; drop `Skipped` items and pass them on under "skipped" for counting."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    kept = [it for it in items if not isinstance(it, Skipped)]
    batch: dict[str, object] = {"skipped": skipped, "ids": [it["id"] for it in kept]}
    if not kept:
        return batch
    length = max(len(it["input_ids"]) for it in kept)  # type: ignore[arg-type]
    ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), length), dtype=torch.long)
    for i, it in enumerate(kept):
        n = len(it["input_ids"])  # type: ignore[arg-type]
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[i, sl], labels[i, sl], mask[i, sl] = it["input_ids"], it["labels"], 1
    pixels = [it["pixel_values"] for it in kept if it["pixel_values"] is not None]
    batch.update(input_ids=ids, labels=labels, attention_mask=mask,
                 pixel_values=torch.cat(pixels) if pixels else None)  # type: ignore[arg-type]
    sizes = [it["image_sizes"] for it in kept if it.get("image_sizes") is not None]
    batch["image_sizes"] = torch.cat(sizes) if sizes else None  # type: ignore[arg-type]
    return batch
