"""The tiny synthetic world of vistune's test parts: a coloured rectangle on a plain background.

`build_dataset` writes a LLaVA-format data set whose answers are true of its images, and `corpus` is
every sentence it can emit plus some prose: the training text of the tiny tokenizers in
`vistune.testing.parts`, so every word a test feeds the model is in their vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------------
# The synthetic world: a coloured rectangle on a plain background.
# The dataset's answers and the tokenizer corpus are both built from these tables, so every word a
# test feeds the model is in the tokenizer's vocabulary as (usually) one token.
# --------------------------------------------------------------------------------------------------

#: colour name -> RGB. Strongly separated colours so even a tiny vision tower can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}

#: (width, height) of the generated images: landscape, portrait and square, all smaller than the
#: 32 px encoder input, so resize/pad code paths get exercised on every aspect ratio.
IMAGE_SIZES: list[tuple[int, int]] = [(40, 28), (24, 36), (32, 32), (48, 24), (28, 40), (36, 36)]

SYSTEM_PROMPT = "You are a helpful assistant."

# Hand-written prose so the vocabulary also covers ordinary question/answer English, not only the
# templated dataset sentences.
_PROSE = """
The red circle is left of the square. The blue square is right of the circle.
A triangle has three sides and a square has four sides. A circle has no corners.
What colour is the shape? The shape is red. What colour is the background? The background is blue.
Where is the shape? The shape is on the left. The shape is on the right. The shape is in the middle.
Is the shape big or small? The shape is small. The shape is big.
Describe the image briefly. Describe the picture in detail. What do you see in this image?
I see a green rectangle on a white background. There is a yellow square in the picture.
The cat sits on the mat. The dog runs in the park. A bird can fly over the tree.
The fish swims in the water. The horse is brown and the cow is black and white.
How many legs does a dog have? A dog has four legs. How many legs does a bird have? A bird has two legs.
What animal says moo? The cow says moo. What animal says woof? The dog says woof.
Which colour do you get when you mix red and blue? You get purple.
Which colour do you get when you mix red and yellow? You get orange.
Which colour do you get when you mix blue and yellow? You get green.
What is the colour of the sky? The sky is blue. What is the colour of grass? Grass is green.
Yes, it is. No, it is not. Please answer the question. Thank you. You are welcome.
Hello! How can I help you today? I am a helpful assistant. Answer with one word.
The image shows a square, a rectangle, a circle, a triangle and a line.
One, two, three, four, five, six, seven, eight, nine, ten.
system user assistant human gpt image picture photo question answer
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.
0 1 2 3 4 5 6 7 8 9 10 , . ? ! : ; ' " ( ) [ ] - + = / * % & # @ _ < > |
"""


def _dataset_facts(i: int) -> dict[str, Any]:
    """The deterministic content of image `i`: size, colours, rectangle box and its position."""
    names = list(COLOURS)
    w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    shape_colour = names[i % len(names)]
    # Offset by a step coprime to len(names) so the background always differs from the shape.
    background = names[(i * 3 + 1) % len(names)]
    if background == shape_colour:
        background = names[(names.index(shape_colour) + 1) % len(names)]
    # Rectangle on the left or right half, alternating; half the width, a square every third image.
    side = "left" if i % 2 == 0 else "right"
    rw = w // 2 - 2
    rh = rw if i % 3 == 0 else h // 2
    rh = min(rh, h - 4)
    x0 = 2 if side == "left" else w - 2 - rw
    y0 = (h - rh) // 2
    shape = "square" if rw == rh else "rectangle"
    return {
        "size": (w, h),
        "colour": shape_colour,
        "background": background,
        "box": (x0, y0, x0 + rw - 1, y0 + rh - 1),
        "side": side,
        "shape": shape,
    }


def _image_qas(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """Question/answer pairs that are true of the image described by `facts`."""
    return [
        ("What colour is the shape?", f"The shape is {facts['colour']}."),
        ("What colour is the background?", f"The background is {facts['background']}."),
        ("Where is the shape?", f"The shape is on the {facts['side']}."),
    ]


def _a(word: str) -> str:
    """`word` with its indefinite article ("a red", "an orange")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _caption(facts: dict[str, Any]) -> str:
    return f"{_a(facts['colour'])} {facts['shape']} on {_a(facts['background'])} background"


#: Text-only instruction data (no image): general knowledge consistent with the corpus.
_TEXT_QAS: list[list[tuple[str, str]]] = [
    [("Which colour do you get when you mix red and blue?", "You get purple.")],
    [("How many sides does a triangle have?", "A triangle has three sides."),
     ("And a square?", "A square has four sides.")],
    [("What animal says moo?", "The cow says moo.")],
    [("What is the colour of the sky?", "The sky is blue.")],
    [("How many legs does a dog have?", "A dog has four legs."),
     ("And a bird?", "A bird has two legs.")],
    [("Which colour do you get when you mix blue and yellow?", "You get green.")],
]


def corpus() -> list[str]:
    """The training text of both tokenizers: prose + every sentence the dataset builder can emit."""
    lines = [ln.strip() for ln in _PROSE.strip().splitlines() if ln.strip()]
    for i in range(48):  # _dataset_facts repeats with period lcm(6 sizes, 8 colours, 2, 3) = 24
        facts = _dataset_facts(i)
        for q, a in _image_qas(facts):
            lines += [q, a]
        lines.append(_caption(facts))
    for conv in _TEXT_QAS:
        for q, a in conv:
            lines += [q, a]
    lines.append(SYSTEM_PROMPT)
    # Repeat so that frequent words out-count rare character pairs during BPE merging and end up
    # as whole-word tokens.
    return lines * 4


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

def _draw(facts: dict[str, Any]) -> Image.Image:
    image = Image.new("RGB", facts["size"], COLOURS[facts["background"]])
    ImageDraw.Draw(image).rectangle(facts["box"], fill=COLOURS[facts["colour"]])
    return image


def build_dataset(out: Path, n_image: int = 12, n_text: int = 4) -> Path:
    """A LLaVA-format dataset folder whose answers are true of its images.

    Writes:
    - `images/img_{i}.png`: a solid background with one coloured rectangle (sizes vary in aspect);
    - `train.json`: instruction records; even-indexed images get 2 rounds (the `<image>` placeholder
      only in the first human turn), odd-indexed ones 1 round; then `n_text` text-only records
      (no `image` key, no placeholder), some multi-turn;
    - `align.json`: one caption record per image ("Describe the image briefly." -> caption).
    """
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    train: list[dict[str, Any]] = []
    align: list[dict[str, Any]] = []
    for i in range(n_image):
        facts = _dataset_facts(i)
        name = f"img_{i}.png"
        _draw(facts).save(images_dir / name)
        qas = _image_qas(facts)
        # Rotate which questions are asked so every question type appears in first position.
        qas = qas[i % len(qas):] + qas[: i % len(qas)]
        rounds = qas[:2] if i % 2 == 0 else qas[:1]
        conversations: list[dict[str, str]] = []
        for r, (q, a) in enumerate(rounds):
            conversations.append({"from": "human", "value": f"<image>\n{q}" if r == 0 else q})
            conversations.append({"from": "gpt", "value": a})
        train.append({"id": f"{i:06d}", "image": name, "conversations": conversations})
        align.append({
            "id": f"align_{i:06d}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": _caption(facts)},
            ],
        })
    for j in range(n_text):
        conversations = []
        for q, a in _TEXT_QAS[j % len(_TEXT_QAS)]:
            conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        train.append({"id": f"text_{j:06d}", "conversations": conversations})

    (out / "train.json").write_text(json.dumps(train, indent=1), encoding="utf-8")
    (out / "align.json").write_text(json.dumps(align, indent=1), encoding="utf-8")
    return out
