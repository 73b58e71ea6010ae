"""Sequence packing: bins, the packed batch's layout, and packed == unpacked loss and gradients (fp32),
with image and text-only samples sharing a row; the chunked loss against transformers' own loss."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vistune.chat.encode import IGNORE_INDEX, ChatEncoder
from vistune.chat.formats import get_format
from vistune.config import LLMConfig, LoraSettings, PartsConfig, VisionConfig
from vistune.data.batch import Batch, Example, collate
from vistune.data.dataset import SupervisedDataset
from vistune.data.records import Problems, load_samples
from vistune.model.checkpoint import build_model
from vistune.model.llm import load_tokenizer
from vistune.model.loss import chunked_lm_loss
from vistune.model.vision import load_image_processor
from vistune.model.vlm import IMAGE_TOKEN_ID
from vistune.train.packing import (
    PackedBatchSampler,
    collate_packed,
    first_fit,
    flatten_rows,
)
from vistune.train.parts import apply_parts


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_keeps_every_item_once_within_capacity(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(40)]
    bins = first_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(40))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert all(b == sorted(b) for b in bins)
    # first-fit decreasing is within 11/9 OPT + 1 bins; the volume bound is a lower bound on OPT
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 64) + 1


def test_an_item_longer_than_a_row_gets_its_own() -> None:
    assert first_fit([10, 100, 5], 20) == [[1], [0, 2]]


def test_packed_sampler_covers_the_epoch_and_depends_only_on_seed_and_epoch() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) * rng.choice([1, -1]) for _ in range(100)]
    a = PackedBatchSampler(lengths, 64, rows=2, seed=3)
    b = PackedBatchSampler(lengths, 64, rows=2, seed=3)
    assert a.batches(0) == b.batches(0) != a.batches(1)
    assert sorted(i for batch in a.batches(0) for i in batch) == list(range(100))
    # rows hold on average far more than one sample
    assert len(a.batches(0)) * 2 < 100 / 1.5
    a.set_epoch(0, 3)
    assert list(a) == b.batches(0)[3:]


def _item(ids: list[int], labels: list[int], n_images: int) -> Example:
    return Example(str(ids[0]), torch.tensor(ids), torch.tensor(labels),
                   torch.full((n_images, 3, 2, 2), float(ids[0])) if n_images else None, None)


def test_packed_layout() -> None:
    items = [_item([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 3, 4], [-100, -100, -100, 3, 4], 1),
             _item([5, 6, 7], [5, 6, 7], 0),
             _item([8, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 9], [-100, -100, -100, 9], 1)]
    b, skipped = collate_packed(items, pad_token_id=0, pack_length=9)
    assert b is not None and skipped == [] and b.ids == ["1", "5", "8"]
    # first-fit decreasing: [5 tokens, 4 tokens] fill row 0 exactly; the 3-token sample goes to row 1
    assert b.input_ids.tolist() == [[1, -200, -200, 3, 4, 8, -200, -200, 9], [5, 6, 7, 0, 0, 0, 0, 0, 0]]
    assert b.position_ids is not None and b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    # each sample's first label is ignored: no token predicts across a boundary
    assert b.labels is not None and b.labels.tolist() == [[-100, -100, -100, 3, 4, -100, -100, -100, 9], [-100, 6, 7] + [-100] * 6]
    assert b.pixel_values is not None and b.pixel_values[:, 0, 0, 0].tolist() == [1.0, 8.0]  # images in row order
    assert b.attention_mask is None and b.num_tokens == 12
    flat = flatten_rows(b)
    assert flat.position_ids is not None and flat.position_ids.shape == (1, 18)
    assert flat.input_ids[0, 9:12].tolist() == [5, 6, 7]


@pytest.fixture(scope="module")
def items(clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> list[Example]:
    """Encoded samples of the test data set: 12 with an image, 4 text-only."""
    tok = load_tokenizer(str(llama_dir))
    enc = ChatEncoder(tok, get_format("chat_template"), 16, 512)
    samples = load_samples(str(dataset_dir / "train.json"), str(dataset_dir / "images"), False, Problems())
    ds = SupervisedDataset(samples, enc, load_image_processor(str(clip_dir)), "pad", False)
    examples = [it for i in range(len(ds)) if isinstance(it := ds[i], Example)]
    assert len(examples) == len(ds)  # none skipped
    return examples


def _model(clip_dir: Path, llama_dir: Path, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir), attn_implementation=attn),
                        "mlp2x_gelu")
    apply_parts(model, PartsConfig(projector="full", llm="full"), LoraSettings(), False)
    return model.train()


def _loss_and_grads(model, batches: list[Batch], n_items: int, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total = 0.0
    for b in batches:
        # use_cache=False as the training loop passes it: with a KV cache transformers ignores packed positions
        extra = {} if b.position_ids is None else {"position_ids": b.position_ids, "use_cache": False}
        out = model(b.input_ids, b.attention_mask, b.pixel_values, labels=b.labels,
                    num_items_in_batch=n_items, **extra, **kw)
        out.loss.backward()
        total += float(out.loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(items: list[Example], clip_dir: Path, llama_dir: Path,
                                                     attn: str) -> None:
    """The same 8 samples (6 with an image, 2 text-only), padded one per row vs packed several per row."""
    chosen = items[:6] + items[12:14]
    n_items = sum(int((it.labels[1:] != IGNORE_INDEX).sum()) for it in chosen)
    model = _model(clip_dir, llama_dir, attn)
    padded = collate(chosen, pad_token_id=0).batch
    assert padded is not None
    loss_ref, grads_ref = _loss_and_grads(model, [padded], n_items)

    longest = max(len(it.input_ids) for it in chosen)
    packed = collate_packed(chosen, pad_token_id=0, pack_length=2 * longest).batch
    assert packed is not None and packed.position_ids is not None
    rows = packed.input_ids.shape[0]
    assert rows < len(chosen)
    # some row holds an image sample and a text-only sample side by side
    starts = packed.position_ids == 0
    mixed = [r for r in range(rows) if (packed.input_ids[r] == IMAGE_TOKEN_ID).any() and int(starts[r].sum()) >= 3]
    assert mixed, "no row mixes samples"
    loss_packed, grads_packed = _loss_and_grads(model, [packed], n_items)
    assert loss_packed == pytest.approx(loss_ref, rel=1e-5)
    assert grads_ref.keys() == grads_packed.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_packed[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)

    # and as one flattened row (the flash-attn varlen layout), the same again
    loss_flat, grads_flat = _loss_and_grads(model, [flatten_rows(packed)], n_items)
    assert loss_flat == pytest.approx(loss_ref, rel=1e-5)
    torch.testing.assert_close(grads_flat["projector.0.weight"], grads_ref["projector.0.weight"], rtol=1e-4, atol=1e-6)


def test_packing_without_position_ids_would_leak(items: list[Example], clip_dir: Path, llama_dir: Path) -> None:
    """The parity above is not vacuous: the same packed rows with plain causal attention give another loss."""
    chosen = items[:6] + items[12:14]
    n_items = sum(int((it.labels[1:] != IGNORE_INDEX).sum()) for it in chosen)
    model = _model(clip_dir, llama_dir)
    longest = max(len(it.input_ids) for it in chosen)
    packed = collate_packed(chosen, pad_token_id=0, pack_length=2 * longest).batch
    assert packed is not None
    right, _ = _loss_and_grads(model, [packed], n_items)
    leaky = replace(packed, position_ids=None)
    wrong, _ = _loss_and_grads(model, [leaky], n_items)
    assert abs(right - wrong) > 1e-3


def test_chunked_loss_equals_the_llms_loss_and_gradients(items: list[Example], clip_dir: Path, llama_dir: Path) -> None:
    chosen = items[:3] + items[12:13]
    batch = collate(chosen, pad_token_id=0).batch
    assert batch is not None
    n_items = batch.supervised_tokens()
    model = _model(clip_dir, llama_dir)
    loss_ref, grads_ref = _loss_and_grads(model, [batch], n_items)
    loss_chunked, grads_chunked = _loss_and_grads(model, [batch], n_items, loss_chunk_size=7)
    assert loss_chunked == pytest.approx(loss_ref, rel=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_chunked[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_unit() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    logits = head(hidden)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    (g_ref,) = torch.autograd.grad(ref, hidden)
    got = chunked_lm_loss(hidden, head, labels, chunk=3)
    (g_got,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    # no supervised token: 0, still attached to the graph
    empty = chunked_lm_loss(hidden, head, torch.full_like(labels, IGNORE_INDEX), chunk=3)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_pack_length_shorter_than_a_sample_is_refused(dataset_dir: Path) -> None:
    from vistune.config import load_config
    from vistune.errors import ConfigError

    with pytest.raises(ConfigError, match="pack_length 64 is shorter than model_max_length 128"):
        load_config(data={"model": {"vision": {"path": "v"}, "llm": {"path": "l"}}, "stages": {"s": {
            "data": {"path": "d.json", "packing": True, "pack_length": 64}, "model_max_length": 128,
            "output_dir": "o", "global_batch_size": 1, "micro_batch_size": 1, "lr": 1.0}}})


def test_packed_equals_unpacked_with_anyres_and_two_image_samples(clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                                                    tmp_path: Path) -> None:
    """anyres gives each image its own token count (from its size); packing must carry the images' sizes
    in the same row order as their pixels, or the tiles land in the wrong slots."""
    from PIL import Image

    sizes = [(40, 20), (20, 40), (30, 30), (90, 50), (32, 32), (50, 20)]
    records = []
    for k, size in enumerate(sizes):
        Image.open(dataset_dir / "images" / f"img_{k}.png").convert("RGB").resize(size).save(tmp_path / f"s{k}.png")
    for k in range(len(sizes)):
        images = [f"s{k}.png", f"s{(k + 1) % len(sizes)}.png"] if k % 2 else [f"s{k}.png"]
        records.append({"id": f"r{k}", "image": images, "conversations": [
            {"from": "human", "value": "<image>\n" * len(images) + "What is there?"},
            {"from": "gpt", "value": f"Shape number {k}."}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hello?"},
                                                    {"from": "gpt", "value": "Hello there."}]})
    (tmp_path / "d.json").write_text(json.dumps(records))

    torch.manual_seed(0)
    model = build_model(VisionConfig(path=str(clip_dir), image_mode="anyres"), LLMConfig(path=str(llama_dir)),
                        "mlp2x_gelu")
    apply_parts(model, PartsConfig(projector="full", llm="full"), LoraSettings(), False)
    model.train()
    enc = ChatEncoder(load_tokenizer(str(llama_dir)), get_format("chat_template"), model.num_image_tokens, 2048)
    samples = load_samples(str(tmp_path / "d.json"), str(tmp_path), False, Problems())
    ds = SupervisedDataset(samples, enc, load_image_processor(str(clip_dir)), "pad", False, layout=model.layout)
    chosen = [it for i in range(len(ds)) if isinstance(it := ds[i], Example)]
    assert len(chosen) == len(ds)  # none skipped
    counts = {int((it.input_ids == IMAGE_TOKEN_ID).sum()) for it in chosen if it.pixel_values is not None}
    assert len(counts) > 2  # the images really take different numbers of tokens
    n_items = sum(int((it.labels[1:] != IGNORE_INDEX).sum()) for it in chosen)

    def run(batch: Batch | None) -> tuple[float, dict[str, torch.Tensor]]:
        assert batch is not None
        return _loss_and_grads(model, [batch], n_items, image_sizes=batch.image_sizes)

    loss_ref, grads_ref = run(collate(chosen, pad_token_id=0).batch)
    longest = max(len(it.input_ids) for it in chosen)
    packed = collate_packed(chosen, pad_token_id=0, pack_length=2 * longest).batch
    assert packed is not None and packed.image_sizes is not None
    assert packed.input_ids.shape[0] < len(chosen)
    assert packed.image_sizes.shape[0] == sum(len(s.images) for s in samples)  # one (h, w) per image
    loss_packed, grads_packed = run(packed)
    assert loss_packed == pytest.approx(loss_ref, rel=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_packed[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Not vacuous: the same sizes in another order lay the tiles out differently (the token totals still
    # match, being a permutation), and the projector's gradient moves well beyond the tolerance above.
    _, grads_shuffled = run(replace(packed, image_sizes=packed.image_sizes.roll(1, 0)))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads_shuffled["projector.0.weight"], grads_ref["projector.0.weight"],
                                   rtol=1e-4, atol=1e-6)
