"""Conversation formats: golden rendered prompts and label masks for every format, and the checks
that keep a tokenization mismatch from passing silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import VICUNA_SYSTEM, Message, Segment, get_format
from vistune.errors import LabelError, RegistryKeyError
from vistune.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID

CONV = [
    Message("user", "<image>\nWhat colour is the shape?"),
    Message("assistant", "The shape is red."),
    Message("user", "Where is it?"),
    Message("assistant", "It is on the left."),
]
N_IMG = 4


def text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def supervised_texts(enc_tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each run of supervised labels (with special tokens, to see the end-of-turn token)."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i, "a label must equal its input id"
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [enc_tok.decode(r) for r in runs]


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer: Path):
    return AutoTokenizer.from_pretrained(str(bpe_tokenizer))


@pytest.fixture(scope="module")
def spm(spm_tokenizer: Path):
    return AutoTokenizer.from_pretrained(str(spm_tokenizer))


def test_vicuna_golden_text(bpe) -> None:
    got = text(get_format("vicuna_v1").render(CONV, bpe, add_generation_prompt=False))
    assert got == (f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT: The shape is red.<|im_end|>"
                   "USER: Where is it? ASSISTANT: It is on the left.<|im_end|>")
    prompt = text(get_format("vicuna_v1").render(CONV[:1], bpe, add_generation_prompt=True))
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT:"


def test_llama2_golden_text(spm) -> None:
    got = text(get_format("llama_2", system="SYS").render(CONV, spm, add_generation_prompt=False))
    assert got == ("[INST] <<SYS>>\nSYS\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST] The shape is red. </s>"
                   "<s>[INST] Where is it? [/INST] It is on the left. </s>")


def test_plain_golden_text(bpe) -> None:
    conv = [Message("user", "<image>\nDescribe the image briefly."), Message("assistant", "a red square")]
    segments = get_format("plain").render(conv, bpe, add_generation_prompt=False)
    assert [s.text for s in segments] == ["<image>", "a red square<|im_end|>"]
    assert [s.supervised for s in segments] == [False, True]


def test_chat_template_golden_text(bpe) -> None:
    got = text(get_format("chat_template").render(CONV, bpe, add_generation_prompt=False))
    assert got == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n"
                   "<|im_start|>assistant\nThe shape is red.<|im_end|>\n"
                   "<|im_start|>user\nWhere is it?<|im_end|>\n"
                   "<|im_start|>assistant\nIt is on the left.<|im_end|>\n")


@pytest.mark.parametrize("fmt,tok_name,expected", [
    ("vicuna_v1", "bpe", ["The shape is red.<|im_end|>", "It is on the left.<|im_end|>"]),
    ("chat_template", "bpe", ["The shape is red.<|im_end|>", "It is on the left.<|im_end|>"]),
    ("vicuna_v1", "spm", ["The shape is red.</s>", "It is on the left.</s>"]),
    ("llama_2", "spm", ["The shape is red. </s>", "It is on the left. </s>"]),
])
def test_label_masks_golden(fmt: str, tok_name: str, expected: list[str], request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(tok_name)
    enc = ChatEncoder(tok, get_format(fmt), N_IMG).encode(CONV, "s1")
    got = [t.strip() for t in supervised_texts(tok, enc.input_ids, enc.labels)]
    assert got == expected
    # the image placeholder became exactly N_IMG image ids, never supervised
    img = [i for i, x in enumerate(enc.input_ids) if x == IMAGE_TOKEN_ID]
    assert len(img) == N_IMG and img == list(range(img[0], img[0] + N_IMG))
    assert all(enc.labels[i] == IGNORE_INDEX for i in img)
    assert enc.n_images == 1


def test_plain_labels(bpe) -> None:
    conv = [Message("user", "<image>\nDescribe."), Message("assistant", "a red square")]
    enc = ChatEncoder(bpe, get_format("plain"), N_IMG).encode(conv, "s")
    assert enc.input_ids[:N_IMG] == [IMAGE_TOKEN_ID] * N_IMG  # no BOS: this tokenizer adds none
    assert supervised_texts(bpe, enc.input_ids, enc.labels) == ["a red square<|im_end|>"]


def test_bos_follows_the_tokenizer(bpe, spm) -> None:
    conv = [Message("user", "hi"), Message("assistant", "hello")]
    assert ChatEncoder(spm, get_format("vicuna_v1"), N_IMG).encode(conv).input_ids[0] == spm.bos_token_id
    assert ChatEncoder(bpe, get_format("vicuna_v1"), N_IMG).encode(conv).input_ids[0] != bpe.bos_token_id


def test_ids_equal_whole_text_tokenization(bpe) -> None:
    """Turn-by-turn ids are exactly the tokenizer's ids for the whole rendered text."""
    conv = [m for m in CONV]
    conv[0] = Message("user", "What colour is the shape?")
    fmt = get_format("chat_template")
    enc = ChatEncoder(bpe, fmt, N_IMG).encode(conv)
    whole = bpe(text(fmt.render(conv, bpe, False)), add_special_tokens=False).input_ids
    assert enc.input_ids == whole


def test_generation_prompt_ends_where_reply_begins(bpe) -> None:
    enc = ChatEncoder(bpe, get_format("chat_template"), N_IMG).encode(CONV[:1], add_generation_prompt=True)
    assert bpe.decode([x for x in enc.input_ids if x >= 0]).endswith("<|im_start|>assistant\n")
    assert enc.n_supervised == 0


def test_mismatch_names_the_sample(bpe) -> None:
    """A reply the tokenizer cannot reproduce (here: it contains the EOS text itself) is an error, not a
    silently masked sample."""
    conv = [Message("user", "hi"), Message("assistant", "bad <|im_end|> reply")]
    with pytest.raises(LabelError, match="sample rec-7"):
        ChatEncoder(bpe, get_format("vicuna_v1"), N_IMG).encode(conv, "rec-7")


def test_truncation_counts_image_tokens_and_never_splits_an_image(bpe) -> None:
    fmt = get_format("vicuna_v1")
    full = ChatEncoder(bpe, fmt, N_IMG).encode(CONV)
    start = full.input_ids.index(IMAGE_TOKEN_ID)
    cut = ChatEncoder(bpe, fmt, N_IMG, max_length=start + 2).encode(CONV)  # would cut inside the image
    assert cut.truncated and len(cut.input_ids) == start and cut.n_images == 0
    short = ChatEncoder(bpe, fmt, N_IMG, max_length=len(full.input_ids) - 3).encode(CONV)
    assert len(short.input_ids) == len(full.input_ids) - 3 and short.n_images == 1


def test_unknown_format_lists_valid_keys() -> None:
    with pytest.raises(RegistryKeyError, match="valid keys: plain, vicuna_v1, llava_v1, llama_2, chat_template"):
        get_format("vicuna")


def test_stop_tokens(bpe, spm) -> None:
    assert ChatEncoder(bpe, get_format("chat_template"), 1).stop_token_ids() == [bpe.convert_tokens_to_ids("<|im_end|>")]
    assert ChatEncoder(spm, get_format("llama_2"), 1).stop_token_ids() == [spm.eos_token_id]


@pytest.mark.parametrize("fmt,tok_name", [("vicuna_v1", "bpe"), ("chat_template", "bpe"), ("vicuna_v1", "spm"),
                                          ("llama_2", "spm")])
def test_offsets_and_prefix_tokenizations_agree(fmt: str, tok_name: str, request: pytest.FixtureRequest) -> None:
    """The fast path (one tokenization, split by character offsets) and the fallback for tokenizers
    without offsets (tokenize every prefix) give the same pieces."""
    tok = request.getfixturevalue(tok_name)
    enc = ChatEncoder(tok, get_format(fmt), N_IMG)
    texts = [s.text for s in get_format(fmt).render(CONV[:2] + [Message("user", "Where is it?")], tok, True)]
    texts = [t.split("<image>")[-1] for t in texts]  # one image-free run
    assert enc._split_by_offsets(texts, "s") == enc._split_by_prefixes(texts, "s")


def test_a_token_across_a_boundary_is_an_error(bpe) -> None:
    enc = ChatEncoder(bpe, get_format("vicuna_v1"), N_IMG)
    with pytest.raises(LabelError, match="sample s9: a token spans the boundary"):
        enc._split_by_offsets(["The sha", "pe is red."], "s9")
    with pytest.raises(LabelError, match="sample s9: the tokenizer merges text across the boundary"):
        enc._split_by_prefixes(["The sha", "pe is red."], "s9")
