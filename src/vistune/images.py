"""Image files as training, inference and the CLI read them: decoded to RGB, or their size read from
the header alone, with Pillow's decompression-bomb limit reported like any unreadable file.

A leaf (Pillow only): the inference engine and the training dataset both load images here.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from vistune.errors import DataError

ImageSource = str | Path | IO[bytes]  # what Image.open reads: a path or an open binary file


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
