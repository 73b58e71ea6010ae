"""The template teacher: writes valid replies of every kind offline, deterministically for a seed.

It answers in exactly the reply format the prompts ask an LLM for (see `parse`), so the same parser
checks both. What it draws on, per kind:
- `detail`, `complex`: what their context shows, the captions and the boxes. Boxes only ever become
  words (counts, categories, positions from box centres, relative positions, sizes from box areas),
  never coordinates.
- `conversation`: the paper's conversation context is captions only. A rule-based teacher cannot
  read object lists out of free-form captions, so here it deviates on purpose: it asks and answers
  its existence/counting/colour/where questions from the boxes (as words), and its opening turn from
  the captions. Data this teacher writes is therefore *more* grounded than GPT-4's conversations,
  never less, and never quotes numbers a model could not see. Pass `conversation_boxes=False` to
  `TemplateTeacher` for the strict captions-only behaviour (the captions then supply every answer).

Categories are either plain nouns ("dog", "dining table") or colour + noun ("red circle",
"blue square"), the demo's synthetic world; the latter also get colour questions.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from vistune.datagen.sources import ImageRecord

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black", "brown", "gray", "grey",
           "pink", "cyan", "magenta")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
              "scissors": "scissors", "child": "children", "man": "men", "woman": "women", "leaf": "leaves"}
# Absent things for "Is there ...?" questions with a "No" answer (COCO-style records).
_COMMON = ("dog", "cat", "car", "person", "bicycle", "chair", "bird", "horse", "umbrella", "pizza")


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def count_phrase(n: int, noun: str) -> str:
    """'one red circle', 'two dogs', '12 cars'."""
    number = NUMBERS[n] if n < len(NUMBERS) else str(n)
    return f"{number} {noun if n == 1 else plural(noun)}"


def article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def sentence(text: str) -> str:
    """A caption as a sentence of ours: capitalised, ending in a full stop."""
    text = text.strip().rstrip(".")
    return (text[:1].upper() + text[1:] + ".") if text else ""


@dataclass(frozen=True)
class Thing:
    category: str
    colour: str | None  # for "red circle": "red"
    noun: str  # for "red circle": "circle"; for "dining table": "dining table"
    cx: float
    cy: float
    area: float

    @property
    def region(self) -> str:
        """Where the box centre lies, in thirds: 'top left', 'left', 'center', ..."""
        h = "left" if self.cx < 1 / 3 else "right" if self.cx > 2 / 3 else ""
        v = "top" if self.cy < 1 / 3 else "bottom" if self.cy > 2 / 3 else ""
        return f"{v} {h}".strip() or "center"

    @property
    def where(self) -> str:
        r = self.region
        if r == "center":
            return "in the center of the image"
        if r in ("left", "right"):
            return f"on the {r} side of the image"
        if r in ("top", "bottom"):
            return f"at the {r} of the image"
        return f"in the {r} part of the image"

    @property
    def size(self) -> str:
        return "large" if self.area > 0.2 else "small" if self.area < 0.03 else "medium-sized"


def things(record: ImageRecord) -> list[Thing]:
    out = []
    for b in record.boxes:
        x1, y1, x2, y2 = b.bbox
        words = b.category.split()
        colour = words[0] if len(words) > 1 and words[0].lower() in COLOURS else None
        noun = " ".join(words[1:]) if colour else b.category
        out.append(Thing(b.category, colour, noun, (x1 + x2) / 2, (y1 + y2) / 2, max(0.0, (x2 - x1) * (y2 - y1))))
    return out


def relation(a: Thing, b: Thing) -> str:
    """Where a is relative to b, by the larger of the horizontal and vertical offsets of their centres."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def inventory(ts: list[Thing]) -> str:
    """'two red circles, one blue square and one green triangle'."""
    return inventory_counts(Counter(t.category for t in ts))


def inventory_counts(counts: Counter[str]) -> str:
    parts = [count_phrase(n, c) for c, n in counts.items() if n > 0]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def qa_block(pairs: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)


class TemplateTeacher:
    """Replies built by rules from an `ImageRecord`; same reply format as an LLM teacher's."""

    name = "template"

    def __init__(self, conversation_boxes: bool = True) -> None:
        self.conversation_boxes = conversation_boxes

    def reply(self, record: ImageRecord, kind: str, rng: random.Random) -> str:
        if kind == "conversation":
            return self.conversation(record, rng)
        if kind == "detail":
            return self.detail(record, rng)
        if kind == "complex":
            return self.complex(record, rng)
        raise ValueError(f"unknown kind {kind!r}")

    # -- conversation: several Q/A turns ---------------------------------------------------------
    def conversation(self, record: ImageRecord, rng: random.Random) -> str:
        pairs: list[tuple[str, str]] = []
        if record.captions:
            q = rng.choice(["What does this image show?", "What is happening in this picture?",
                            "Can you tell me what you see in the image?"])
            pairs.append((q, sentence(record.captions[0])))
        ts = things(record) if self.conversation_boxes else []
        if not ts:
            for extra in record.captions[1:3]:  # captions only: each further one answers a rephrased ask
                pairs.append(("What else can you say about the scene?", sentence(extra)))
            if not pairs:
                pairs.append(("Is there anything in the image?", "The image does not show any clear objects."))
            return qa_block(pairs)
        counts = Counter(t.category for t in ts)
        unique = [t for t in ts if counts[t.category] == 1]
        candidates: list[tuple[str, str]] = []
        present = rng.choice(list(counts))
        n = counts[present]
        candidates.append((f"Is there {article(present)} in the image?",
                           f"Yes, there {'is' if n == 1 else 'are'} {count_phrase(n, present)} in the image."))
        absent = self._absent(ts, counts, rng)
        if absent:
            candidates.append((f"Is there {article(absent)} in the image?", f"No, there is no {absent} in the image."))
        counted = rng.choice(list(counts))
        n = counts[counted]
        candidates.append((f"How many {plural(counted)} are there?",
                           f"There {'is' if n == 1 else 'are'} {count_phrase(n, counted)}."))
        coloured = [t for t in ts if t.colour]
        if coloured:
            nouns = Counter(t.noun for t in coloured)
            noun = rng.choice(list(nouns))
            colours = sorted({t.colour for t in coloured if t.noun == noun})
            if nouns[noun] == 1:
                candidates.append((f"What colour is the {noun}?", f"The {noun} is {colours[0]}."))
            else:
                joined = colours[0] if len(colours) == 1 else ", ".join(colours[:-1]) + " and " + colours[-1]
                candidates.append((f"What colour are the {plural(noun)}?", f"The {plural(noun)} are {joined}."))
        if unique:
            t = rng.choice(unique)
            candidates.append((f"What kind of object is {t.where.replace('of the image', 'of the picture')}?",
                               f"It is {article(t.category)}."))
            t = rng.choice(unique)
            candidates.append((f"Where is the {t.category}?", f"The {t.category} is {t.where}."))
        if len(unique) >= 2:
            a, b = rng.sample(unique, 2)
            candidates.append((f"Where is the {a.category} relative to the {b.category}?",
                               f"The {a.category} is {relation(a, b)} the {b.category}."))
        rng.shuffle(candidates)
        pairs += candidates[: rng.randint(3, 5)]
        return qa_block(pairs)

    @staticmethod
    def _absent(ts: list[Thing], counts: Counter[str], rng: random.Random) -> str | None:
        if any(t.colour for t in ts):  # synthetic world: a colour of a present shape that is not there
            options = [f"{c} {t.noun}" for t in ts if t.colour for c in COLOURS[:8] if f"{c} {t.noun}" not in counts]
        else:
            options = [c for c in _COMMON if c not in counts]
        return rng.choice(sorted(set(options))) if options else None

    # -- detail: one paragraph, no coordinates -----------------------------------------------------
    def detail(self, record: ImageRecord, rng: random.Random) -> str:
        ts = things(record)
        out = []
        if record.captions:
            out.append(sentence(record.captions[0]))
        if ts:
            out.append(f"In total the scene holds {inventory(ts)}.")
            by_size = sorted(ts, key=lambda t: -t.area)
            big = by_size[0]
            out.append(f"The largest object is {article(big.size + ' ' + big.category)} {big.where}.")
            for t in by_size[1:4]:
                out.append(rng.choice([f"{article(t.category).capitalize()} sits {t.where}.",
                                       f"There is also {article(t.size + ' ' + t.category)} {t.where}."]))
            counts = Counter(t.category for t in ts)
            pair = [t for t in by_size if counts[t.category] == 1][:2]
            if len(pair) == 2:
                a, b = pair
                out.append(f"Seen together, the {a.category} is {relation(a, b)} the {b.category}.")
        for extra in record.captions[1:3]:
            out.append(sentence(extra))
        if len(" ".join(out).split()) < 8:
            out.append("The scene is simple, with little else to point out.")
        return " ".join(out)

    # -- complex: one reasoning question, a multi-sentence answer -------------------------------------
    def complex(self, record: ImageRecord, rng: random.Random) -> str:
        ts = things(record)
        if not ts:
            caption = sentence(record.captions[0]).rstrip(".") if record.captions else "A simple scene"
            return qa_block([("What might be going on in this scene, and what makes you think so?",
                              (f"{caption}, so that is most likely what is going on. Everything visible points to "
                               "that one situation, which looks like an ordinary, everyday moment. Nothing in the "
                               "picture suggests anything unusual is happening."))])
        counts = Counter(t.category for t in ts)
        options = ["arrangement"]
        if len(ts) >= 2:
            options.append("main subject")
        if len(counts) >= 2:
            options.append("remove one")
        choice = rng.choice(options)
        if choice == "main subject":
            by_size = sorted(ts, key=lambda t: -t.area)
            big, rest = by_size[0], by_size[1:]
            q = "Which object is most likely the main subject of this image, and why?"
            a = (f"The {big.category} is most likely the main subject. It is the largest object in the picture "
                 f"and sits {big.where}, where it draws the eye first. The other objects, such as "
                 f"{article(rest[0].category)} {rest[0].where}, take up less space, so they read as secondary. "
                 f"With {inventory(ts)} in view, the size difference is what sets the {big.category} apart.")
        elif choice == "remove one":
            gone = rng.choice(list(counts))
            left = Counter(counts)
            left[gone] -= 1
            left = +left
            ranked = left.most_common()
            tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
            q = f"If one {gone} were taken out of the scene, how many objects would be left, and which kind would be most common?"
            a = (f"The image has {inventory(ts)}, {len(ts)} objects in all. Taking one {gone} away leaves "
                 f"{len(ts) - 1} {'object' if len(ts) - 1 == 1 else 'objects'}: {inventory_counts(left)}. "
                 + ("No single kind would then be the most common, since several kinds would be equally frequent."
                    if tie else f"The most common kind would then be the {ranked[0][0]}, with "
                                f"{count_phrase(ranked[0][1], ranked[0][0])}."))
        else:
            left = [t for t in ts if t.cx < 0.5]
            right = [t for t in ts if t.cx >= 0.5]
            balance = "fairly balanced" if abs(len(left) - len(right)) <= 1 else "lopsided"
            heavier = "left" if len(left) > len(right) else "right"
            q = "How are the objects spread across this image, and does the layout look balanced?"
            a = (f"There {'is' if len(left) == 1 else 'are'} {len(left)} "
                 f"{'object' if len(left) == 1 else 'objects'} in the left half and {len(right)} in the right half. "
                 f"That makes the layout {balance}"
                 f"{'' if balance == 'fairly balanced' else f', with more weight on the {heavier}'}. "
                 f"The {ts[0].category} {ts[0].where} anchors the composition.")
        return qa_block([(q, a)])
