"""The special token values every layer agrees on: the image placeholder in text, the image id in
`input_ids`, and the label value the loss skips. A leaf: it imports nothing, so the tokenizer layer
(`chat`) can use these without pulling in torch or the model.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a message's text, as LLaVA's records write it

# Image positions in `input_ids`, one id per image token (see `vistune.model.vlm`). The value LLaVA uses,
# kept for familiarity; it is negative so it is never looked up in the embedding table: no row is added
# to the LLM's vocabulary and a frozen LLM stays exactly as loaded.
IMAGE_TOKEN_ID = -200

IGNORE_INDEX = -100  # the label value transformers' loss (and torch's cross_entropy default) skips

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID"]
