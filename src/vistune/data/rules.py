"""The rules a stage applies to each sample's messages before its conversation format renders them.

One rule today, LLaVA-1.5's `preprocess_multimodal`: a turn holding one `<image>` placeholder has it
removed, the text stripped, and `<image>\\n` put in front. LLaVA-Instruct's first turns put the image
before or after the question at random, while every evaluation prompt puts it first; moving it makes
training look like testing, as LLaVA-1.5 trained. A turn with several placeholders keeps them where
they are (their order says which image is which; LLaVA-1.5 never had such turns).
`data.image_placement: keep` leaves every placeholder where the data puts it.

Training (`train.loop`) and `vistune data show` both call `apply_rules`, so what `data show` prints is
what the stage trains on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from vistune.chat.formats import IMAGE_PLACEHOLDER, Message
from vistune.data.records import Sample

ImagePlacement = Literal["front", "keep"]


def image_first(message: Message) -> Message:
    """A single-image turn with its placeholder moved to the front, as LLaVA's preprocess_multimodal
    does (remove, strip, `<image>\\n` + text, strip); other turns unchanged."""
    if message.content.count(IMAGE_PLACEHOLDER) != 1:
        return message
    text = message.content.replace(IMAGE_PLACEHOLDER, "").strip()
    # The final strip drops the "\n" when the turn held nothing but the image, as LLaVA's does.
    return replace(message, content=(IMAGE_PLACEHOLDER + "\n" + text).strip())


def apply_rules(samples: list[Sample], image_placement: ImagePlacement) -> list[Sample]:
    """The samples as the stage trains on them (new Sample objects; the input is not changed)."""
    if image_placement == "keep":
        return samples
    out = []
    for s in samples:
        messages = tuple(image_first(m) if m.role == "user" else m for m in s.messages)
        out.append(s if messages == s.messages else replace(s, messages=messages))
    return out
