"""Facts about images shared by training, inference and evaluation. A leaf: no torch, no model.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MEAN = (0.5, 0.5, 0.5)  # for a processor that names no mean
# The settings of an encoder's image processor that carry over to the LLaVA (`pad`) and LLaVA-NeXT (`anyres`)
# processors transformers builds on it: resize, crop, rescale and normalise.
PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                    "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def pad_colour(processor: Any) -> tuple[int, ...]:
    """The colour, 0-255 RGB, that pads an image for `processor` (an HF image processor): its `image_mean`,
    so padding normalises to zero. Truncated, not rounded, as LLaVA's `expand2square`
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


__all__ = ["PROCESSOR_FIELDS", "carried_fields", "pad_colour"]
