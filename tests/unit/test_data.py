"""Data: record checks with errors that name the record, skip-and-count, collation, batch sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_files import bomb_png
from transformers import AutoTokenizer

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import get_format
from vistune.data.batch import Example, Skipped, collate
from vistune.data.dataset import SupervisedDataset
from vistune.data.records import Problems, load_samples, parse_record
from vistune.data.sampler import GroupedBatchSampler
from vistune.errors import DataError
from vistune.model.vision import load_image_processor


def rec(**kw):
    base = {"id": "r1", "image": "img_0.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    base.update(kw)
    return base


@pytest.mark.parametrize("record,message", [
    (rec(conversations=[]), "record r1: no `conversations` list"),
    (rec(conversations=None), "record r1: no `conversations` list"),
    (rec(image=None), "record r1: 1 <image> placeholder\\(s\\) for 0 image\\(s\\)"),
    (rec(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]),
     "record r1: 0 <image> placeholder\\(s\\) for 1 image\\(s\\)"),
    (rec(image="nope.png"), "record r1: image file .*nope.png does not exist"),
    (rec(conversations=[{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>"}]),
     "record r1: turn 0 is from assistant, expected user"),
    (rec(conversations=[{"from": "robot", "value": "<image>"}]), "record r1: turn 0 is from 'robot'"),
    (rec(conversations=[{"from": "human", "value": "<image>"}]), "record r1: no gpt reply"),
])
def test_bad_records_name_the_record(record: dict, message: str, dataset_dir: Path) -> None:
    with pytest.raises(DataError, match=message):
        parse_record(record, 0, dataset_dir / "images")


def _write(tmp_path: Path, records: list, name: str = "d.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_error_or_skip_and_count(tmp_path: Path, dataset_dir: Path) -> None:
    records = [rec(id="good"), rec(id="bad", image="missing.png"), rec(id="bad2", conversations=[])]
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match="record bad: image file .* does not exist.*on_bad_sample=skip"):
        load_samples(path, dataset_dir / "images", skip_bad=False, problems=Problems())
    problems = Problems()
    samples = load_samples(path, dataset_dir / "images", skip_bad=True, problems=problems)
    assert [s.id for s in samples] == ["good"]
    assert problems.counts == {"missing image file": 1, "no conversations": 1}
    assert "2 samples skipped" in problems.summary()


def test_jsonl_and_bad_json(tmp_path: Path, dataset_dir: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(rec()) + "\n\n" + json.dumps(rec(id="r2")) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:4: not valid JSON"):
        load_samples(p, dataset_dir / "images", False, Problems())
    p.write_text(json.dumps(rec()) + "\n")
    assert len(load_samples(p, dataset_dir / "images", False, Problems())) == 1


@pytest.fixture(scope="module")
def encoder(bpe_tokenizer: Path) -> ChatEncoder:
    return ChatEncoder(AutoTokenizer.from_pretrained(str(bpe_tokenizer)), get_format("vicuna_v1"), 16, 256)


def test_corrupt_image_is_named_or_skipped(tmp_path: Path, clip_dir: Path, encoder: ChatEncoder) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write(tmp_path, [rec(id="corrupt", image="broken.png")])
    samples = load_samples(path, tmp_path, False, Problems())
    proc = load_image_processor(clip_dir)
    with pytest.raises(DataError, match="sample corrupt: image .*broken.png cannot be read"):
        SupervisedDataset(samples, encoder, proc, "pad", skip_bad=False)[0]
    item = SupervisedDataset(samples, encoder, proc, "pad", skip_bad=True)[0]
    assert isinstance(item, Skipped) and item.reason == "unreadable image"


def test_fully_truncated_sample_is_skipped_and_counted(tmp_path: Path, dataset_dir: Path, clip_dir: Path,
                                                      bpe_tokenizer: Path) -> None:
    tight = ChatEncoder(AutoTokenizer.from_pretrained(str(bpe_tokenizer)), get_format("vicuna_v1"), 16, 20)
    samples = load_samples(dataset_dir / "train.json", dataset_dir / "images", False, Problems())
    item = SupervisedDataset(samples[:1], tight, load_image_processor(clip_dir), "pad", skip_bad=False)[0]
    assert isinstance(item, Skipped) and item.reason == "all reply tokens truncated"


def test_dataset_and_collate(dataset_dir: Path, clip_dir: Path, encoder: ChatEncoder) -> None:
    samples = load_samples(dataset_dir / "train.json", dataset_dir / "images", False, Problems())
    ds = SupervisedDataset(samples, encoder, load_image_processor(clip_dir), "pad", skip_bad=False)
    image_item = ds[0]
    text_item = ds[len(ds) - 1]
    assert isinstance(image_item, Example) and isinstance(text_item, Example)
    assert image_item.pixel_values is not None and image_item.pixel_values.shape == (1, 3, 32, 32)
    assert text_item.pixel_values is None
    batch, skipped = collate([image_item, text_item, Skipped("x", "r", "m")], pad_token_id=0)
    assert batch is not None and batch.ids == [image_item.id, text_item.id]
    assert batch.input_ids.shape[0] == 2 and batch.pixel_values is not None
    assert batch.pixel_values.shape == (1, 3, 32, 32)
    assert [s.id for s in skipped] == ["x"]
    n = len(text_item.input_ids)
    assert batch.attention_mask is not None and batch.labels is not None
    assert batch.attention_mask[1].sum() == n and (batch.labels[1, n:] == -100).all()
    assert batch.num_tokens == len(image_item.input_ids) + n
    left = collate([image_item, text_item], pad_token_id=0, padding_side="left").batch
    assert left is not None and left.attention_mask is not None
    assert left.attention_mask[1, -1] == 1 and left.attention_mask[1, 0] == 0
    assert left.input_ids[1, -n:].tolist() == text_item.input_ids.tolist()  # the same padding as generation's
    assert collate([Skipped("y", "r", "m")], pad_token_id=0).batch is None  # nothing left to train on


def test_grouped_sampler_keeps_modalities_apart_and_is_deterministic() -> None:
    lengths = [10, 200, 30, 40, -5, -50, 70, -8, 90, 15, -60, 33]
    sampler = GroupedBatchSampler(lengths, batch_size=2, seed=3)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    mixed = [b for b in batches if len({lengths[i] > 0 for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] in batches[-2:])  # only the remainders mix
    assert sampler.batches(0) == GroupedBatchSampler(lengths, 2, seed=3).batches(0)
    assert sampler.batches(1) != sampler.batches(0)
    sampler.set_epoch(0, skip_batches=2)
    assert list(sampler) == batches[2:]


def test_precheck_finds_bad_labels_before_training(dataset_dir: Path, bpe_tokenizer: Path) -> None:
    from vistune.chat.formats import Message
    from vistune.data.precheck import precheck
    from vistune.data.records import Sample

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer))
    enc = ChatEncoder(tok, get_format("vicuna_v1"), 16, 160)
    good = load_samples(dataset_dir / "train.json", dataset_dir / "images", False, Problems())
    bad = Sample("bad-7", (), (Message("user", "hi"), Message("assistant", "x <|im_end|> y")))
    long = Sample("long-1", (), (Message("user", "word " * 300), Message("assistant", "ok")))
    samples = [*good, bad, long]
    with pytest.raises(DataError, match="sample bad-7: the supervised tokens decode to"):
        precheck(samples, enc, skip_bad=False, problems=Problems())
    problems = Problems()
    kept, lengths = precheck(samples, enc, skip_bad=True, problems=problems)
    assert [s.id for s in kept] == [s.id for s in good]
    assert problems.counts == {"labels do not match the replies": 1, "all reply tokens truncated": 1}
    expected = [len(enc.encode(list(s.messages)).input_ids) * (1 if s.images else -1) for s in good]
    assert lengths == expected
    # the same answer from worker processes
    problems2 = Problems()
    assert precheck(samples, enc, True, problems2, workers=2, pool_min=4) == (kept, lengths)
    assert problems2.counts == problems.counts


# -- an image over Pillow's bomb limit and a broken JSONL line are bad records (issue 17 items 8, 14) ----

def test_image_over_the_bomb_limit_is_named_or_skipped(tmp_path: Path, clip_dir: Path, encoder: ChatEncoder) -> None:
    from vistune.images import image_size

    bomb_png(tmp_path / "bomb.png")
    samples = load_samples(_write(tmp_path, [rec(id="bomb", image="bomb.png")]), tmp_path, False, Problems())
    proc = load_image_processor(clip_dir)
    with pytest.raises(DataError, match="sample bomb: image .*bomb.png is too large to decode safely"):
        SupervisedDataset(samples, encoder, proc, "pad", skip_bad=False)[0]
    with pytest.raises(DataError, match="sample bomb: image .*bomb.png is too large"):
        image_size(tmp_path / "bomb.png", "bomb")  # what hd/anyres token counting reads
    item = SupervisedDataset(samples, encoder, proc, "pad", skip_bad=True)[0]
    assert isinstance(item, Skipped) and item.reason == "image over the decompression-bomb limit"


def test_invalid_jsonl_line_is_skipped_and_counted(tmp_path: Path, dataset_dir: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes((json.dumps(rec()) + "\n{oops\n" + json.dumps(rec(id="r2")) + "\n").encode() + b"\xff\xfe\x00{\n")
    problems = Problems()
    assert [s.id for s in load_samples(p, dataset_dir / "images", True, problems)] == ["r1", "r2"]
    assert problems.counts == {"invalid JSON line": 2}
    assert problems.examples["invalid JSON line"][0].startswith(f"{p}:2: not valid JSON")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON .*set data.on_bad_sample=skip"):
        load_samples(p, dataset_dir / "images", False, Problems())


