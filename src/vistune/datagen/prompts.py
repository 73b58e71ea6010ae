"""Prompt files -> chat messages. The files live in `prompts/` (package data) and can be replaced by
a folder of the same layout (`--prompts DIR`):

    {kind}/system.txt                                   the teacher's system message
    {kind}/example_N.context.txt, example_N.response.txt  few-shot pairs, in N order
    detail_instructions.txt, brief_instructions.txt     one instruction a line, `#` comments

`conversation` sees the captions only; `detail` and `complex` the captions and the boxes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from vistune.chat.formats import IMAGE_PLACEHOLDER
from vistune.datagen.context import symbolic_context
from vistune.datagen.sources import ImageRecord
from vistune.errors import DataError

PROMPTS_DIR = Path(__file__).parent / "prompts"
WITH_BOXES = {"conversation": False, "detail": True, "complex": True}


@dataclass(frozen=True)
class KindPrompt:
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response)

    def messages(self, record: ImageRecord, with_boxes: bool) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}]
        for context, response in self.examples:
            msgs += [{"role": "user", "content": context}, {"role": "assistant", "content": response}]
        msgs.append({"role": "user", "content": symbolic_context(record, with_boxes)})
        return msgs


def load_kind(kind: str, folder: Path | None = None) -> KindPrompt:
    d = (folder or PROMPTS_DIR) / kind
    if not (d / "system.txt").is_file():
        raise DataError(f"no prompt for kind {kind!r}: {d / 'system.txt'} does not exist")
    examples = []
    for ctx in sorted(d.glob("example_*.context.txt"), key=lambda p: int(p.name.split("_")[1].split(".")[0])):
        resp = ctx.with_name(ctx.name.replace(".context.txt", ".response.txt"))
        if not resp.is_file():
            raise DataError(f"few-shot context {ctx} has no {resp.name} beside it")
        examples.append((ctx.read_text(encoding="utf-8").strip(), resp.read_text(encoding="utf-8").strip()))
    return KindPrompt((d / "system.txt").read_text(encoding="utf-8").strip(), tuple(examples))


def load_instructions(name: str, folder: Path | None = None) -> list[str]:
    """`detail` or `brief`: the instruction list, comments and blank lines dropped."""
    path = (folder or PROMPTS_DIR) / f"{name}_instructions.txt"
    if not path.is_file():
        raise DataError(f"instruction list {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise DataError(f"instruction list {path} is empty")
    return out


def place_image(text: str, rng: random.Random) -> str:
    """The image before or after the question, at random, as the LLaVA paper does."""
    return f"{IMAGE_PLACEHOLDER}\n{text}" if rng.random() < 0.5 else f"{text}\n{IMAGE_PLACEHOLDER}"
