"""The inference engine: greedy decoding is deterministic and equals a step-by-step argmax, streaming
and batching give the same answers as a plain call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vistune
from vistune.errors import DataError
from vistune.infer.engine import Engine, Sampling

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
    batch = engine._batch([engine.prepare(conv, [image(dataset_dir)])])
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
