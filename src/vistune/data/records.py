"""Training data: reading records and checking them before any training starts.

Three record layouts are read (a file may mix them); each has one `<image>` placeholder in a user turn per
image, the i-th placeholder standing for the i-th image:
- LLaVA's: `{"id": ..., "image": "rel/path.jpg" or a list of paths (optional), "conversations": [{"from":
  "human"|"gpt", "value": ...}, ...]}`.
- LLaMA-Factory's sharegpt: the same `conversations`, images as an `images` list.
- OpenAI / TRL `messages`: `{"images": [...], "messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`,
  content a string (with `<image>` placeholders, as LLaMA-Factory writes it) or a list of parts
  `{"type": "text", "text": ...}` and `{"type": "image"}` (TRL), an image part standing where its
  placeholder goes; an image part may name its file itself (`{"type": "image", "image": "rel/path.jpg"}`).
A JSON file holds a list of records, a JSONL file one record per line.

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


def read_records(path: str | Path, problems: Problems | None = None) -> list[dict[str, Any]]:
    """All records of a .json (list) or .jsonl file; errors name the file and line. With `problems`
    (skip-and-count), a JSONL line that is not valid JSON is counted there and left out instead."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        with path.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not a crash
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    message = f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', 'not UTF-8 text')})"
                    if problems is None:
                        raise DataError(message, "invalid JSON line") from None
                    problems.add("invalid JSON line", message)
        return records
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); JSONL files need the .jsonl suffix") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


LAYOUTS = ("LLaVA's ({\"image\", \"conversations\": [{\"from\", \"value\"}]}), LLaMA-Factory's sharegpt "
           "({\"images\": [...], \"conversations\": [...]}) and OpenAI/TRL messages ({\"images\": [...], "
           "\"messages\": [{\"role\", \"content\"}]})")


def _conversation_turns(rid: str, convs: list) -> list[Message]:
    """LLaVA's and sharegpt's turns: {"from": human|gpt|system, "value": text}."""
    messages = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"record {rid}: turn {j} needs a string `value`")
        role = ROLES.get(str(turn.get("from")))
        if role is None:
            raise DataError(f"record {rid}: turn {j} is from {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        messages.append(Message(role, turn["value"].strip()))  # type: ignore[arg-type]
    return messages


def _content_text(rid: str, j: int, content: Any, inline_images: list[str]) -> str:
    """A message's content as text: a string as is; a list of parts joined by newlines, an image part
    becoming its placeholder (and its file, when it names one, appended to `inline_images`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"record {rid}: message {j}'s content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            named = part.get("image", part.get("path"))
            if named is not None and not isinstance(named, str):
                raise DataError(f"record {rid}: message {j}: an image part names its file by a path string")
            if named is not None:
                inline_images.append(named)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise DataError(f"record {rid}: message {j} has a content part {repr(part)[:80]}; vistune reads "
                            "{\"type\": \"text\", \"text\": ...} and {\"type\": \"image\"} parts "
                            "(image files in the record's `images` list or the part's `image` key)")
    return "\n".join(pieces)


def _message_turns(rid: str, msgs: list, inline_images: list[str]) -> list[Message]:
    """OpenAI/TRL turns: {"role": user|assistant|system, "content": text or parts}."""
    messages = []
    for j, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "content" not in msg:
            raise DataError(f"record {rid}: message {j} needs `role` and `content`")
        role = ROLES.get(str(msg.get("role")))
        if role is None:
            raise DataError(f"record {rid}: message {j} has role {msg.get('role')!r}; expected user, assistant "
                            "or system")
        text = _content_text(rid, j, msg["content"], inline_images).strip()
        messages.append(Message(role, text))  # type: ignore[arg-type]
    return messages


def _record_turns(record: dict, rid: str) -> tuple[list[Message], Any]:
    """The record's turns and its image names, from whichever layout it is in."""
    inline: list[str] = []
    key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
    if key is None:
        raise DataError(f"record {rid}: no `conversations` or `messages` list (keys: {sorted(record)}); vistune "
                        f"reads {LAYOUTS}", "no conversations")
    if not isinstance(record[key], list) or not record[key]:
        raise DataError(f"record {rid}: no `{key}` list (an empty list or a {type(record[key]).__name__})",
                        "no conversations")
    if key == "conversations":
        messages = _conversation_turns(rid, record[key])
    else:
        messages = _message_turns(rid, record[key], inline)
    if "image" in record and "images" in record:
        raise DataError(f"record {rid}: has both `image` and `images`; give the files in one of them")
    image = record.get("image", record.get("images"))
    if inline:
        if image:
            raise DataError(f"record {rid}: image parts name files and the record has an images list too; "
                            "give the files in one place")
        image = inline
    return messages, image


def parse_record(record: Any, index: int, image_folder: Path | None) -> Sample:
    """Check one record's structure and turn it into a Sample; DataError names what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record #{index}: not a JSON object")
    rid = str(record.get("id", f"#{index}"))
    messages, image = _record_turns(record, rid)
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
    try:
        records = read_records(path, problems if skip_bad else None)
    except DataError as e:
        if e.reason != "invalid JSON line":
            raise
        raise DataError(f"{e} (set data.on_bad_sample=skip to drop such lines)", e.reason) from None
    samples = []
    for i, record in enumerate(records):
        try:
            samples.append(parse_record(record, i, folder))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}: {e} (set data.on_bad_sample=skip to drop such records)") from None
            problems.add(e.reason, str(e))
    if not samples:
        raise DataError(f"{path}: no usable records")
    return samples
