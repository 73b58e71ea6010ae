"""LLaVA-1.5 fidelity (issue 18 items 1-4): the rendered text and supervised spans of LLaVA-1.5's
formats written out literally, the `<image>` move of LLaVA's preprocess_multimodal, and the presets'
stage-1 settings (the per-stage preprocessing run is e2e/test_fidelity_training.py).

Expected strings come from LLaVA-1.5's documented formats (llava/conversation.py at the 1.5 release):
conv_vicuna_v1 = system + " " + "USER: q ASSISTANT: a</s>" per round (SeparatorStyle.TWO, sep " ",
sep2 "</s>"); conv_llava_plain = image + caption + sep. The tokenizer is a Llama-style sentencepiece
one whose EOS is "</s>", as Vicuna's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from vistune.chat.encode import IGNORE_INDEX, ChatEncoder
from vistune.chat.formats import Message, get_format
from vistune.config import load_config
from vistune.data.records import Sample
from vistune.data.rules import apply_rules, image_first
from vistune.data.show import render_sample

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LLAVA_15_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def spm(spm_tokenizer: Path):
    return AutoTokenizer.from_pretrained(str(spm_tokenizer))


def shown(spm, messages: list[Message], fmt: str = "vicuna_v1", placement: str = "front", images: int = 1):
    sample = Sample("s1", tuple(Path(f"img{i}.png") for i in range(images)), tuple(messages))
    [sample] = apply_rules([sample], placement)  # type: ignore[arg-type]
    return render_sample(sample, get_format(fmt), spm, ChatEncoder(spm, get_format(fmt), 1))


def supervised_decoded(spm, messages: list[Message], fmt: str, images: int) -> list[str]:
    """What the labelled tokens decode to, run by run (special tokens kept)."""
    enc = ChatEncoder(spm, get_format(fmt), num_image_tokens=1).encode(list(messages), "s1",
                                                                      image_tokens=[1] * images)
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    runs += [cur] if cur else []
    return [spm.decode(r) for r in runs]


def test_two_turn_image_conversation(spm) -> None:
    got = shown(spm, [Message("user", "<image>\nWhat is the man doing?"),
                      Message("assistant", "He is ironing clothes."),
                      Message("user", "Is it safe?"), Message("assistant", "No, it is not.")])
    assert got.text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is the "
                        "man doing? ASSISTANT: He is ironing clothes.</s>USER: Is it safe? ASSISTANT: No, it is "
                        "not.</s>")
    assert got.supervised == [" He is ironing clothes.</s>", " No, it is not.</s>"]
    assert got.error is None
    # the labelled token ids decode to exactly these spans (sentencepiece folds the space into the first token)
    assert supervised_decoded(spm, [Message("user", "<image>\nWhat is the man doing?"),
                                    Message("assistant", "He is ironing clothes."),
                                    Message("user", "Is it safe?"), Message("assistant", "No, it is not.")],
                              "vicuna_v1", 1) == ["He is ironing clothes.</s>", "No, it is not.</s>"]


def test_image_after_question_moves_to_the_front(spm) -> None:
    turns = [Message("user", "What is the man doing?\n<image>"), Message("assistant", "Ironing.")]
    got = shown(spm, turns)
    assert got.text == (f"{LLAVA_15_SYSTEM} USER: <image>\nWhat is the man doing? ASSISTANT: Ironing.</s>")
    assert got.supervised == [" Ironing.</s>"]
    kept = shown(spm, turns, placement="keep")
    assert kept.text == f"{LLAVA_15_SYSTEM} USER: What is the man doing?\n<image> ASSISTANT: Ironing.</s>"


def test_text_only_sample(spm) -> None:
    got = shown(spm, [Message("user", "Name a colour."), Message("assistant", "Blue.")], images=0)
    assert got.text == f"{LLAVA_15_SYSTEM} USER: Name a colour. ASSISTANT: Blue.</s>"
    assert got.supervised == [" Blue.</s>"]


def test_plain_caption(spm) -> None:
    """LLaVA's plain target is caption + "\\n"; vistune's is caption + EOS (docs/llava-differences.md says why)."""
    turns = [Message("user", "Describe the image briefly.\n<image>"), Message("assistant", "a red square")]
    got = shown(spm, turns, fmt="plain")
    assert got.text == "<image>a red square</s>"
    assert got.supervised == ["a red square</s>"]
    assert supervised_decoded(spm, turns, "plain", 1) == ["a red square</s>"]
    # What LLaVA's preprocess_plain supervises instead: caption + conv_llava_plain.sep ("\n"), tokenized with
    # BOS and no EOS, so its last target token is the newline byte token, never EOS.
    llava_ids = spm("a red square\n").input_ids
    assert spm.convert_ids_to_tokens(llava_ids[-1]) == "<0x0A>" and spm.eos_token_id not in llava_ids


def test_llava_v1_keeps_the_original_system_prompt(spm) -> None:
    got = shown(spm, [Message("user", "Hi"), Message("assistant", "Hello.")], fmt="llava_v1", images=0)
    assert got.text == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                        "helpful, detailed, and polite answers to the human's questions. USER: Hi ASSISTANT: Hello.</s>")


@pytest.mark.parametrize("content,expected", [
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("Look: <image> what is it?", "<image>\nLook:  what is it?"),   # removed, stripped, not re-spaced (as LLaVA)
    ("<image>", "<image>"),                                          # the image alone: no trailing newline
    ("  <image>\n  Q?  ", "<image>\nQ?"),
    ("Compare <image> with <image>.", "Compare <image> with <image>."),  # several images keep their order
    ("No image here.", "No image here."),
])
def test_image_first_follows_preprocess_multimodal(content: str, expected: str) -> None:
    assert image_first(Message("user", content)).content == expected


def test_image_in_a_later_turn_moves_to_the_front_of_that_turn() -> None:
    sample = Sample("s", (Path("a.png"),), (Message("user", "Hi"), Message("assistant", "Hello"),
                                            Message("user", "And this? <image>"), Message("assistant", "A cat")))
    [moved] = apply_rules([sample], "front")
    assert [m.content for m in moved.messages] == ["Hi", "Hello", "<image>\nAnd this?", "A cat"]
    assert apply_rules([sample], "keep")[0] is sample


def test_presets_preprocess_and_group_as_llava_15() -> None:
    for name in ("llava-1.5-7b", "llava-1.5-13b", "llava-1.5-7b-lora"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        align, ft = cfg.stages["align"], cfg.stages["finetune"]
        assert (align.image_preprocess or cfg.model.vision.image_preprocess) == "processor"  # LLaVA's `square`
        assert (ft.image_preprocess or cfg.model.vision.image_preprocess) == "pad"
        assert align.data.group_by_modality_length is False and ft.data.group_by_modality_length is True
        assert align.data.image_placement == ft.data.image_placement == "front"
        assert align.tf32 and ft.tf32


def test_tf32_switch_follows_the_stage_on_cuda_only() -> None:
    from vistune.train.loop import tf32_matmuls

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    with tf32_matmuls(True, cuda=True):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before  # restored
    with tf32_matmuls(False, cuda=True):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    with tf32_matmuls(True, cuda=False):  # no effect off CUDA
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
