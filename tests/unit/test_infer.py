"""The inference engine: greedy decoding is deterministic and equals a step-by-step argmax, streaming
and batching give the same answers as a plain call."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import vistune
from vistune.errors import DataError
from vistune.infer.engine import Engine, Job, Sampling

GREEDY = Sampling(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    e = vistune.load(str(tiny_checkpoint), device="cpu")
    # A tiny random model may say EOS at once; for these tests we want long replies to compare.
    e.stop_ids = []
    return e


def image(dataset_dir: Path, i: int = 0) -> Path:
    return dataset_dir / "images" / f"img_{i}.png"


def test_greedy_equals_stepwise_argmax(engine: Engine, dataset_dir: Path) -> None:
    """generate() with its KV cache picks exactly the argmax tokens of full forward passes."""
    conv = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}]
    batch = engine.inputs([engine.prepare(conv, [image(dataset_dir)])])
    new = engine.model.generate(**batch, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                eos_token_id=[], pad_token_id=engine.tokenizer.pad_token_id)[0].tolist()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    manual = []
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            nxt = int(engine.model(ids, mask, batch["pixel_values"]).logits[0, -1].argmax())
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert new == manual
    # The engine's batched path (its own per-row stopping) gives the same reply.
    assert engine.generate([conv], [[image(dataset_dir)]], GREEDY)[0] == \
        engine.tokenizer.decode(manual, skip_special_tokens=True).strip()


def test_greedy_is_deterministic_and_streams_the_same(engine: Engine, dataset_dir: Path) -> None:
    conv = [{"role": "user", "content": "What colour is the shape?"}]
    a = engine.chat(conv, [image(dataset_dir)], GREEDY)
    assert a and a == engine.chat(conv, [image(dataset_dir)], GREEDY)
    streamed = list(engine.chat(conv, [image(dataset_dir)], GREEDY, stream=True))
    assert len(streamed) > 1 and "".join(streamed).strip() == a


def test_batch_equals_one_by_one(engine: Engine, dataset_dir: Path) -> None:
    """Left-padded batches (an image and a text-only conversation, different lengths) change nothing."""
    convs = [[{"role": "user", "content": "<image>\nWhat colour is the background?"}],
             [{"role": "user", "content": "Name a shape."}],
             [{"role": "user", "content": "<image>\nIs the shape on the left?"}]]
    imgs = [[image(dataset_dir, 1)], [], [image(dataset_dir, 2)]]
    batched = engine.generate(convs, imgs, GREEDY)
    single = [engine.generate([c], [i], GREEDY)[0] for c, i in zip(convs, imgs)]
    assert batched == single


def test_multi_turn_and_sampling_seed(engine: Engine, dataset_dir: Path) -> None:
    conv = [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
            {"role": "assistant", "content": "The shape is red."},
            {"role": "user", "content": "And the background?"}]
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert engine.chat(conv, [image(dataset_dir)], sampled) == engine.chat(conv, [image(dataset_dir)], sampled)


def test_placeholder_count_must_match(engine: Engine, dataset_dir: Path) -> None:
    with pytest.raises(DataError, match="1 <image> placeholder"):
        engine.chat([{"role": "user", "content": "<image>\nhi"}], [], GREEDY)
    with pytest.raises(DataError, match="cannot be read"):
        engine.chat([{"role": "user", "content": "hi"}], [dataset_dir / "train.json"], GREEDY)


def test_rows_in_one_batch_keep_their_own_settings(engine: Engine, dataset_dir: Path) -> None:
    """One generate call: a seeded sampled row gives the same reply alone and beside greedy rows; each
    row stops at its own token cap; usage counts are per row."""
    conv = [{"role": "user", "content": "What colour is the shape?"}]
    prompt = engine.prepare(conv, [image(dataset_dir)])
    seeded = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.8, seed=11)
    alone = engine.run([Job(prompt, seeded)])[0]
    mixed = engine.run([Job(prompt, Sampling(max_new_tokens=3)), Job(prompt, seeded), Job(prompt, GREEDY)])
    assert mixed[1] == alone
    assert [c.completion_tokens for c in mixed] == [3, 10, 12]
    assert [c.finish_reason for c in mixed] == ["length"] * 3
    assert mixed[2].text.startswith(mixed[0].text)  # greedy prefix: the short row is the long one cut
    assert all(c.prompt_tokens == len(prompt.input_ids) for c in mixed)


def test_stop_strings_cut_the_reply_and_never_stream(engine: Engine, dataset_dir: Path) -> None:
    conv = [{"role": "user", "content": "What colour is the shape?"}]
    full = engine.chat(conv, [image(dataset_dir)], GREEDY)
    stop = full.split()[2]  # a word inside the reply
    pieces: list[str] = []
    c = engine.run([Job(engine.prepare(conv, [image(dataset_dir)]),
                        Sampling(max_new_tokens=12, stop=(stop, "never said")), pieces.append)])[0]
    assert c.finish_reason == "stop" and c.text == full[: full.index(stop)]
    assert "".join(pieces) == c.text and stop not in "".join(pieces)


def test_cancel_ends_a_row_and_closing_a_stream_stops_it(engine: Engine) -> None:
    prompt = engine.prepare([{"role": "user", "content": "Count."}])
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            cancel.set()
    c, other = engine.run([Job(prompt, Sampling(max_new_tokens=200), on_text, cancel),
                           Job(prompt, Sampling(max_new_tokens=20))])
    assert c.finish_reason == "cancelled" and c.completion_tokens < 10
    assert other.finish_reason == "length" and other.completion_tokens == 20
    stream = engine.stream([{"role": "user", "content": "Count."}], sampling=Sampling(max_new_tokens=2000))
    next(stream)
    start = time.monotonic()
    stream.close()  # cancels and joins the worker: fast, not 2,000 tokens later
    assert time.monotonic() - start < 5
