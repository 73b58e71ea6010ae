"""Teacher replies -> question/answer pairs, or a rejection with a short reason.

The reply format (the prompts ask every teacher for it, and the template teacher writes it):
- `conversation`: several blocks `Question: ...` / `Answer: ...`, alternating, question first;
- `complex`: exactly one `Question:` / `Answer:` block;
- `detail`: one descriptive paragraph (no labels).
A label may stand alone on its line with the text below it; `===` separator lines (the LLaVA
prompts' style), markdown bold and numbering (`**Question 2:**`) are tolerated.

Every check that fails raises `Rejected` with a reason from `REASONS`, so that the summary counts
rejections by a small fixed set of causes.
"""

from __future__ import annotations

import re

KINDS = ("conversation", "detail", "complex")

REASONS = (
    "empty reply",
    "truncated (finish_reason=length)",
    "no question/answer turns",
    "turns do not alternate",
    "empty question or answer",
    "complex: not exactly one question and answer",
    "mentions captions or bounding boxes",
    "leaks coordinates",
    "detail: too short",
    "detail: written as question/answer turns",
)


class Rejected(Exception):
    """A reply that cannot become training data; `reason` is one of REASONS (or a teacher error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_LABEL = re.compile(
    r"^[ \t>#*_-]*(?:\d+[.)]\s*)?(question|answer|q|a)(?:\s*\d+)?[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^\s*(?:={3,}|-{3,})\s*$", re.MULTILINE)
# What the context shows and the data must not: the word caption(s), bounding boxes, and coordinates
# (a bracketed list of numbers, or the context's 3-decimal numbers such as 0.412).
_META = re.compile(r"\bcaptions?\b|\bbounding[ -]?box(?:es)?\b|\bcoordinates?\b", re.IGNORECASE)
_COORDS = re.compile(r"\[\s*-?\d*\.?\d+\s*,\s*-?\d*\.?\d+|(?<![\d.])\d?\.\d{3}(?!\d)")


def check_text(text: str) -> None:
    """Checks every kind shares: no talk of captions or boxes, no coordinates."""
    if _META.search(text):
        raise Rejected("mentions captions or bounding boxes")
    if _COORDS.search(text):
        raise Rejected("leaks coordinates")


def split_turns(text: str) -> list[tuple[str, str]]:
    """`Question:`/`Answer:` blocks -> [(question, answer), ...]; Rejected when they do not alternate."""
    text = _SEPARATOR.sub("", text)
    labels = list(_LABEL.finditer(text))
    if not labels:
        raise Rejected("no question/answer turns")
    blocks = []
    for m, nxt in zip(labels, [*labels[1:], None]):
        role = "q" if m.group(1).lower().startswith("q") else "a"
        body = text[m.end(): nxt.start() if nxt else len(text)].strip()
        blocks.append((role, body))
    if [r for r, _ in blocks] != ["q", "a"] * (len(blocks) // 2) or len(blocks) % 2:
        raise Rejected("turns do not alternate")
    pairs = [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]
    if any(not q or not a for q, a in pairs):
        raise Rejected("empty question or answer")
    return pairs


def parse_reply(kind: str, text: str, finish_reason: str | None = "stop") -> list[tuple[str, str]]:
    """A reply as (question, answer) pairs; for `detail` one pair whose question is "" (the
    instruction is drawn from the detail-instruction list instead)."""
    text = (text or "").strip()
    if not text:
        raise Rejected("empty reply")
    if finish_reason == "length":
        raise Rejected("truncated (finish_reason=length)")
    if kind == "detail":
        check_text(text)
        if _LABEL.search(text):  # a teacher that answered in turns did not write a description
            raise Rejected("detail: written as question/answer turns")
        if len(text.split()) < 8:
            raise Rejected("detail: too short")
        return [("", text)]
    pairs = split_turns(text)
    if kind == "complex" and len(pairs) != 1:
        raise Rejected("complex: not exactly one question and answer")
    for q, a in pairs:
        check_text(q)
        check_text(a)
    return pairs
