"""What a benchmark task is: items to ask (prompt + images), and how to score the replies.

A task reads its benchmark from a local folder in the benchmark's published layout, builds each
prompt as LLaVA-1.5 did (the response-format line per task), and scores replies with the functions in
`vistune.eval.metrics`. Generation, batching, sharding and resume belong to `vistune.eval.run`.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

# Re-exported (`as` the same name) for the tasks: the response-format lines, whose one home is shared with the
# training data (datagen.mix), and the atomic write, under the name the eval modules call it by.
from vistune.answer_formats import LETTER_ANSWER as LETTER_ANSWER
from vistune.answer_formats import LETTER_ANSWER_CN as LETTER_ANSWER_CN
from vistune.answer_formats import SHORT_ANSWER as SHORT_ANSWER
from vistune.answer_formats import VIZWIZ_UNANSWERABLE as VIZWIZ_UNANSWERABLE
from vistune.errors import DataError
from vistune.files import write_text as write_text_atomic  # noqa: F401 (re-export)

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

    from vistune.eval.judge import Judge

ImageRef = Path | Image.Image | bytes  # a file, an image, or encoded bytes (base64-decoded TSV cells)


@dataclass(frozen=True)
class Item:
    """One question to ask. `id` is unique within the task and keys the predictions file."""

    id: str
    prompt: str
    images: tuple[ImageRef, ...] = ()
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set `name`, `folder`, `headline` and implement `load` and `score`.
    Every task takes the option `answers`: an answer file in LLaVA's layout to score instead of
    generating (see `vistune.eval.answers`)."""

    name: str = ""
    folder: str = ""  # its folder under --data, as LLaVA's playground/data/eval/ names it
    max_new_tokens: int = 128  # LLaVA-1.5's model_vqa_loader default for short-answer tasks
    headline: tuple[str, ...] = ()  # metric keys shown in the results table
    judged: bool = False
    answers: Path | None = None

    def __init__(self, answers: str | Path | None = None) -> None:
        self.answers = Path(answers) if answers is not None else None

    def llava_keys(self, items: Sequence[Item]) -> dict[str, str | None]:
        """Key of each item in LLaVA's answer files -> item id (by default the id is LLaVA's question_id);
        None for questions LLaVA answered that the task does not score (skipped, and counted)."""
        return {it.id: it.id for it in items}

    def llava_row_key(self, row: dict[str, Any]) -> str:
        """The key a LLaVA answer row gives its question (matched against `llava_keys`)."""
        return str(row["question_id"])

    def load(self, root: Path) -> list[Item]:
        raise NotImplementedError

    def score(self, items: Sequence[Item], replies: dict[str, str], judge: Judge | None = None) -> dict:
        raise NotImplementedError

    def write_submission(self, items: Sequence[Item], replies: dict[str, str], out: Path) -> list[Path]:
        """Files for the benchmark's evaluation server, if it has one."""
        return []

    def images(self, item: Item, processor: BaseImageProcessor) -> list:
        """The images handed to the engine for `item` (encoded bytes decoded here, at batch time).
        `processor`, the model's image processor, is there for a task that draws images of its own in
        the model's terms (the demo's blank images take its mean colour)."""
        return [decode_image(ref) for ref in item.images]

    def batch_group(self, item: Item) -> str | None:
        """Items of different groups never share a batch (None: no constraint)."""
        return None


def with_line(text: str, line: str) -> str:
    """`text` + a newline + `line`, unless LLaVA's question file already baked the line in."""
    text = text.rstrip("\n")
    return text if text.endswith(line) else f"{text}\n{line}"


def find(root: Path, names: Sequence[str], task: str) -> Path:
    """The first of `names` (glob patterns) present under root; a DataError listing them otherwise."""
    for name in names:
        hits = sorted(root.glob(name))
        if hits:
            return hits[0]
    raise DataError(f"{task}: none of {', '.join(names)} found in {root} (see `vistune eval --help` for the "
                    "layout each task reads)", "missing file")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})", "bad file") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})", "bad file") from None
    return rows


def decode_image(ref: ImageRef) -> Image.Image | Path:
    """Bytes become a PIL image (RGB); paths and images pass through."""
    if isinstance(ref, bytes):
        with Image.open(io.BytesIO(ref)) as im:
            return im.convert("RGB")
    return ref


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def accuracy(flags: Sequence[bool | float]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def missing(items: Sequence[Item], replies: dict[str, str]) -> int:
    """How many items have no reply (the runner fills all; a hand-made predictions file may not)."""
    return sum(1 for it in items if it.id not in replies)
