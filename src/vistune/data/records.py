"""The LLaVA data format: reading records and checking them before any training starts.

A record is `{"id": ..., "image": "rel/path.jpg" or a list of paths (optional), "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}` with one `<image>` placeholder in a human turn per image; the i-th placeholder stands for the i-th image. A JSON
file holds a list of records, a JSONL file one record per line.

Records are read as written; a stage then moves single-image placeholders to the front of their turn
as LLaVA-1.5 does (`data.rules`, `data.image_placement`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistune.chat.formats import IMAGE_PLACEHOLDER, Message
from vistune.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Sample:
    id: str
    images: tuple[Path, ...]
    messages: tuple[Message, ...]

    @property
    def n_words(self) -> int:
        """A cheap length estimate for batching by length (LLaVA uses the same)."""
        return sum(len(m.content.split()) for m in self.messages)


@dataclass
class Problems:
    """Records dropped under `on_bad_sample: skip`, counted by reason, with a few examples each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        lines = [f"{self.total} samples skipped:"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} x {reason} (e.g. {self.examples[reason][0]})")
        return "\n".join(lines)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a .json (list) or .jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return records
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); JSONL files need the .jsonl suffix") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


def parse_record(record: Any, index: int, image_folder: Path | None) -> Sample:
    """Check one record's structure and turn it into a Sample; DataError names what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record #{index}: not a JSON object")
    rid = str(record.get("id", f"#{index}"))
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"record {rid}: no `conversations` list", "no conversations")
    messages = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"record {rid}: turn {j} needs a string `value`")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise DataError(f"record {rid}: turn {j} is from {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        messages.append(Message(role, turn["value"].strip()))  # type: ignore[arg-type]
    if messages[0].role == "system":
        messages = messages[1:]
    for j, m in enumerate(messages):
        want = "user" if j % 2 == 0 else "assistant"
        if m.role != want:
            raise DataError(f"record {rid}: turn {j} is from {m.role}, expected {want} (human and gpt must alternate, "
                            "human first)", "turns do not alternate")
    if len(messages) < 2:
        raise DataError(f"record {rid}: no gpt reply to train on", "no gpt reply")
    if any(IMAGE_PLACEHOLDER in m.content for m in messages if m.role == "assistant"):
        raise DataError(f"record {rid}: {IMAGE_PLACEHOLDER} in a gpt turn; it belongs in a human turn")

    image = record.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"record {rid}: `image` must be a path or a list of paths")
    placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(names):
        raise DataError(f"record {rid}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(names)} image(s); "
                        "each image needs exactly one placeholder", "image/placeholder mismatch")
    if names and image_folder is None:
        raise DataError(f"record {rid}: has an image but the stage's data.image_folder is not set")
    images = tuple((image_folder / n) if image_folder else Path(n) for n in names)
    for p in images:
        if not p.is_file():
            raise DataError(f"record {rid}: image file {p} does not exist", "missing image file")
    return Sample(rid, images, tuple(messages))


def load_samples(path: str | Path, image_folder: str | Path | None, skip_bad: bool,
                 problems: Problems) -> list[Sample]:
    """Parse and check every record up front, so a bad record fails the run at its start, not hours in."""
    folder = Path(image_folder) if image_folder else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    samples = []
    for i, record in enumerate(read_records(path)):
        try:
            samples.append(parse_record(record, i, folder))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}: {e} (set data.on_bad_sample=skip to drop such records)") from None
            problems.add(e.reason, str(e))
    if not samples:
        raise DataError(f"{path}: no usable records")
    return samples
