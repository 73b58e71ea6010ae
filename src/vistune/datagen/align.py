"""Stage-1 alignment data: captions -> `plain`-style records, as LLaVA's CC3M-595K / LCS-558K.

One record per image (a caption drawn at random among the image's captions; `per_caption=True`
gives one record per caption, ids `{image id}-{i}`). The human turn is a brief-caption instruction
with the image placed before or after it at random, the gpt turn the caption:

    {"id": "139", "image": "000000000139.jpg",
     "conversations": [{"from": "human", "value": "Describe the image concisely.\\n<image>"},
                       {"from": "gpt", "value": "A living room with a couch and a tv."}]}

The paper's filter (`np_filter=True`, off by default): extract each caption's noun phrases, count
every unique phrase over the whole set, drop captions holding a phrase seen fewer than
`min_np_count` times, and keep at most `max_np_count` captions for any phrase (captions visited in
a seeded random order; a caption is kept while any of its frequent phrases still has room).
Noun phrases come from TextBlob's bundled pattern chunker (`pip install 'vistune[nlp]'`): it works
offline from PyPI alone, unlike spaCy (its English model is not on PyPI) or NLTK's taggers and
TextBlob's default extractor (both need a data download).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vistune.datagen.outputs import write_records
from vistune.datagen.prompts import load_instructions, place_image
from vistune.datagen.sources import ImageRecord
from vistune.datagen.summary import Summary
from vistune.errors import VistuneError

_DROP_TAGS = {"DT", "PRP$", "CD", "WDT", "PDT"}  # "a dog", "the dog", "two dogs" -> one phrase


def noun_phrases(text: str) -> list[str]:
    """Lower-cased noun phrases of `text`, determiners and numbers dropped: 'a small blue square' ->
    'small blue square'. Needs TextBlob (the `nlp` extra)."""
    try:
        from textblob.en import parse
    except ImportError:
        raise VistuneError("the noun-phrase filter needs TextBlob: pip install 'vistune[nlp]'") from None
    phrases: list[str] = []
    for sent in parse(text, tokenize=True, tags=True, chunks=True, relations=False, lemmata=False).split():
        current: list[str] | None = None  # words of the noun phrase being read
        for word, tag, chunk, *_ in sent:
            if chunk != "I-NP" and current:  # a phrase ends where no NP continues it
                phrases.append(" ".join(current))
            if chunk == "B-NP" or (chunk == "I-NP" and current is None):
                current = []
            elif chunk != "I-NP":
                current = None
            if current is not None and tag not in _DROP_TAGS and word.isalnum():
                current.append(word.lower())
        if current:
            phrases.append(" ".join(current))
    return phrases


def np_filter(captions: list[str], min_count: int = 3, max_count: int = 100, seed: int = 0,
              extract: Callable[[str], list[str]] = noun_phrases) -> tuple[list[int], dict[str, int]]:
    """Indices of captions kept by the paper's noun-phrase filter, and the counts of drop reasons."""
    phrases = [set(extract(c)) for c in captions]
    freq = Counter(p for ps in phrases for p in ps)
    order = list(range(len(captions)))
    random.Random(seed).shuffle(order)
    used: Counter[str] = Counter()
    kept, dropped = [], Counter()
    for i in order:
        ps = phrases[i]
        if not ps:
            dropped["no noun phrase"] += 1
            continue
        if any(freq[p] < min_count for p in ps):
            dropped[f"rare noun phrase (< {min_count})"] += 1
            continue
        frequent = [p for p in ps if freq[p] > max_count]
        if frequent and all(used[p] >= max_count for p in frequent):
            dropped[f"frequent noun phrase capped at {max_count}"] += 1
            continue
        used.update(ps)
        kept.append(i)
    return sorted(kept), dict(dropped)


def run_align(records: list[ImageRecord], out: Path, *, seed: int = 0, per_caption: bool = False,
              filter_noun_phrases: bool = False, min_np_count: int = 3, max_np_count: int = 100,
              prompts_dir: Path | None = None) -> Summary:
    """Write the alignment set to `out` (JSONL, or a JSON list when it ends in .json)."""
    instructions = load_instructions("brief", prompts_dir)
    items: list[tuple[str, ImageRecord, str]] = []  # (id, record, caption)
    for r in records:
        if not r.captions:
            continue
        if per_caption:
            items += [(f"{r.id}-{i}", r, c) for i, c in enumerate(r.captions)]
        else:
            items.append((r.id, r, random.Random(f"{seed}:{r.id}:caption").choice(r.captions)))
    summary = Summary()
    if filter_noun_phrases:
        keep, dropped = np_filter([c for _, _, c in items], min_np_count, max_np_count, seed)
        items = [items[i] for i in keep]
        for reason, n in dropped.items():
            summary.reject(reason, n)
    data: list[dict[str, Any]] = []
    for sid, r, caption in items:
        rng = random.Random(f"{seed}:{sid}:align")
        data.append({"id": sid, "image": r.image, "conversations": [
            {"from": "human", "value": place_image(rng.choice(instructions), rng)},
            {"from": "gpt", "value": caption}]})
    summary.wrote("align", len(data))
    write_records(Path(out), data, "align")
    return summary
