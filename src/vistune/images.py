"""Facts about images shared by training, inference, evaluation and the CLI. A leaf (Pillow only; no torch,
no model):

- image files as they are read: decoded to RGB, or their size read from the header alone, with Pillow's
  decompression-bomb limit reported like any unreadable file (the inference engine and the training
  dataset both load images here);
- the pad colour of an image processor, and the processor fields that carry over to the LLaVA and
  LLaVA-NeXT processors transformers builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from vistune.errors import DataError

ImageSource = str | Path | IO[bytes]  # what Image.open reads: a path or an open binary file
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # for a processor that names no mean
# The settings of an encoder's image processor that carry over to the LLaVA (`pad`) and LLaVA-NeXT (`anyres`)
# processors transformers builds on it: resize, crop, rescale and normalise.
PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _too_large(path: ImageSource, sample: str, error: Image.DecompressionBombError) -> DataError:
    # Pillow refuses, at open, a header claiming over 2 x MAX_IMAGE_PIXELS (179 MP by default): decoding it
    # could take gigabytes. It is the record's fault, so it is skipped or named like any bad record.
    return DataError(f"sample {sample}: image {path} is too large to decode safely ({error}); resize it or drop the "
                     "record", "image over the decompression-bomb limit")


def image_size(path: ImageSource, sample: str) -> tuple[int, int]:
    """(height, width) read from the file's header only (no decoding), for token counts up front."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Image.DecompressionBombError as e:
        raise _too_large(path, sample, e) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"sample {sample}: image {path} cannot be read ({e})", "unreadable image") from None


def load_image(path: ImageSource, sample: str) -> Image.Image:
    """The image at `path` decoded as RGB; a DataError naming `sample` when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _too_large(path, sample, e) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"sample {sample}: image {path} cannot be read ({e})", "unreadable image") from None


def pad_colour(processor: Any) -> tuple[int, ...]:
    """The colour, 0-255 RGB, that pads an image for `processor` (an HF image processor): its `image_mean`,
    so padding normalises to about zero. Truncated, not rounded, as LLaVA's `expand2square`
    (`tuple(int(x * 255) for x in image_mean)`) and transformers' LlavaImageProcessor do."""
    mean = getattr(processor, "image_mean", None) or DEFAULT_MEAN
    return tuple(int(m * 255) for m in mean)


def carried_fields(source: Any) -> dict[str, Any]:
    """`source`'s (an HF image processor's) `PROCESSOR_FIELDS` that are set, as keyword arguments for
    transformers' LlavaImageProcessor or LlavaNextImageProcessor. Those center-crop to 224 by default, so
    `do_center_crop` is False unless `source` sets it: an encoder processor without a crop (SigLIP) must not crop."""
    fields = {k: v for k, v in source.to_dict().items() if k in PROCESSOR_FIELDS and v is not None}
    fields.setdefault("do_center_crop", False)
    return fields
