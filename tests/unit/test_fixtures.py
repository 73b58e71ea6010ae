"""The fixture folders load through transformers' generic Auto classes, as real checkpoints do.

If one of these fails, every test built on that fixture is meaningless, so they are kept quick and
run first in the suite's alphabetical order of concerns (tokenizers, vision, LLM, data).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    LlamaForCausalLM,
    SiglipVisionModel,
)

from vistune.testing import COLOURS, SYSTEM_PROMPT, build_llama

# ---------------------------------------------------------------------------------------- tokenizers


def test_bpe_tokenizer_adds_no_bos_and_keeps_words_whole(bpe_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    ids = tok("The shape is red.").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    for word in ["red", "shape", "colour", "background", "square", "What", "assistant"]:
        assert len(tok.tokenize(" " + word)) == 1, word
    # special tokens in text are matched as single tokens (the chat template relies on it)
    assert tok("<|im_start|>user\n").input_ids[0] == tok.bos_token_id
    text = "The café ✓ has 3 cats."
    assert tok.decode(tok(text).input_ids) == text
    assert 500 <= len(tok) <= 1000


def test_bpe_chat_template_default_system(bpe_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    msgs = [
        {"role": "user", "content": "What colour is the shape?"},
        {"role": "assistant", "content": "The shape is red."},
    ]
    system = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        system
        + "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n"
        + "<|im_start|>assistant\nThe shape is red.<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        system + "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, msgs[0]]
    assert tok.apply_chat_template(own, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is the shape?<|im_end|>\n"
    )
    # transformers 5: tokenize=True returns a BatchEncoding (return_dict defaults to True), not a list
    enc = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    assert enc["input_ids"] == tok(tok.apply_chat_template(msgs[:1], tokenize=False,
                                                           add_generation_prompt=True)).input_ids


def test_spm_tokenizer_adds_bos_and_round_trips(spm_tokenizer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(spm_tokenizer)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.unk_token_id
    assert tok("a").input_ids[0] == tok.bos_token_id
    text = "The red circle is left of the square."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.tokenize("The shape")[0] == "▁The"
    # byte fallback: characters never seen in training still round-trip, through <0xNN> tokens
    exotic = "Zebra café ✓"
    assert tok.decode(tok(exotic).input_ids, skip_special_tokens=True) == exotic
    assert "<0xE2>" in tok.tokenize(exotic)
    assert tok.chat_template is None


# -------------------------------------------------------------------------------------------- vision


def _probe_image() -> Image.Image:
    # Non-square on purpose: the processor must still produce a 32x32 input.
    return Image.new("RGB", (40, 28), COLOURS["red"])


def test_clip_vision_half_loads_from_two_tower_folder(clip_dir: Path) -> None:
    cfg = AutoConfig.from_pretrained(clip_dir)
    assert hasattr(cfg, "vision_config")
    model, info = AutoModel.from_pretrained(clip_dir, config=cfg.vision_config, output_loading_info=True)
    assert isinstance(model, CLIPVisionModel)
    assert not info["missing_keys"], info  # the vision weights really came from the checkpoint
    # transformers 5 flattened CLIPVisionModel (no `.vision_model` submodule, keys without the
    # `vision_model.` prefix); the prefix in the two-tower file is mapped away at load time.
    full = CLIPModel.from_pretrained(clip_dir).vision_model.state_dict()
    mine = model.state_dict()
    assert mine.keys() == full.keys() and all(torch.equal(mine[k], full[k]) for k in mine)

    processor = AutoImageProcessor.from_pretrained(clip_dir)
    pixel_values = processor(images=[_probe_image()], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    assert len(out.hidden_states) == cfg.vision_config.num_hidden_layers + 1
    assert out.hidden_states[-2].shape == (1, (32 // 8) ** 2 + 1, 32)


def test_siglip_vision_loads(siglip_dir: Path) -> None:
    model, info = AutoModel.from_pretrained(siglip_dir, output_loading_info=True)
    assert isinstance(model, SiglipVisionModel)
    assert not info["missing_keys"], info
    processor = AutoImageProcessor.from_pretrained(siglip_dir)
    pixel_values = processor(images=[_probe_image()], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 16, 32)


# ----------------------------------------------------------------------------------------------- LLM


def test_llama_folders_are_self_contained(llama_dir: Path, llama_spm_dir: Path) -> None:
    for folder, adds_bos in [(llama_dir, False), (llama_spm_dir, True)]:
        tok = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert isinstance(model, LlamaForCausalLM)
        assert not info["missing_keys"], info
        assert model.dtype == torch.float32
        cfg = model.config
        assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert model.generation_config.eos_token_id == tok.eos_token_id
        enc = tok(["What colour is the shape?", "Hi"], padding=True, return_tensors="pt")
        assert (enc.input_ids[:, 0] == tok.bos_token_id).all().item() is adds_bos
        with torch.no_grad():
            logits = model(**enc).logits
        assert logits.shape == (2, enc.input_ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()
        gen = model.generate(**tok("The shape is", return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert gen.shape[1] <= len(tok("The shape is").input_ids) + 3


def test_llama_build_is_deterministic(llama_dir: Path, bpe_tokenizer: Path, tmp_path: Path) -> None:
    again = build_llama(tmp_path / "again", bpe_tokenizer)
    a = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- data


def test_dataset_records_match_their_images(dataset_dir: Path) -> None:
    train = json.loads((dataset_dir / "train.json").read_text())
    align = json.loads((dataset_dir / "align.json").read_text())
    image_recs = [r for r in train if "image" in r]
    text_recs = [r for r in train if "image" not in r]
    assert len(image_recs) == 12 and len(text_recs) == 4 and len(align) == 12
    assert len({r["id"] for r in train + align}) == len(train) + len(align)
    assert {len(r["conversations"]) for r in image_recs} == {2, 4}  # single- and multi-turn
    assert any(len(r["conversations"]) > 2 for r in text_recs)

    sizes = set()
    name_of = {rgb: name for name, rgb in COLOURS.items()}
    for rec in image_recs + align:
        convs = rec["conversations"]
        assert [c["from"] for c in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert convs[0]["value"].startswith("<image>\n")
        assert sum(c["value"].count("<image>") for c in convs) == 1
        image = Image.open(dataset_dir / "images" / rec["image"]).convert("RGB")
        sizes.add(image.size)
        background = name_of[image.getpixel((0, 0))]
        colours = {name_of[image.getpixel((x, y))] for x in range(image.width) for y in range(image.height)}
        (shape,) = colours - {background}
        xs = [x for x in range(image.width) for y in range(image.height)
              if name_of[image.getpixel((x, y))] == shape]
        side = "left" if sum(xs) / len(xs) < image.width / 2 else "right"
        for q, a in zip(convs[::2], convs[1::2]):
            if "colour is the shape" in q["value"]:
                assert a["value"] == f"The shape is {shape}."
            elif "colour is the background" in q["value"]:
                assert a["value"] == f"The background is {background}."
            elif "Where is the shape" in q["value"]:
                assert a["value"] == f"The shape is on the {side}."
            elif "Describe" in q["value"]:
                assert a["value"].split()[1] == shape and a["value"].endswith(f" {background} background")
    assert len({w / h > 1 for w, h in sizes}) == 2  # landscape and portrait both present
    for rec in text_recs:
        assert all("<image>" not in c["value"] for c in rec["conversations"])
