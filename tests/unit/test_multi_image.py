"""Several images per sample, without training: placeholder checks, the demo world's comparison questions,
anyres token counts in worker processes, the hd global tile (the runs are in e2e/test_multi_image_runs.py).

The data: records with two images each ("Which image shows a red shape? ... The first."), plus the
single-image fixture records, so batches mix one- and two-image samples of different sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_files import two_image_data

from vistune.data.records import Problems, load_samples
from vistune.errors import DataError


def test_placeholder_count_mismatch_is_rejected_with_the_id(dataset_dir: Path, tmp_path: Path) -> None:
    data = two_image_data(dataset_dir, tmp_path, bad=True)
    with pytest.raises(DataError, match="record pair_bad: 1 <image> placeholder"):
        load_samples(data, dataset_dir / "images", skip_bad=False, problems=Problems())
    problems = Problems()
    samples = load_samples(data, dataset_dir / "images", skip_bad=True, problems=problems)
    assert problems.counts == {"image/placeholder mismatch": 1}
    assert [len(s.images) for s in samples if s.id.startswith("pair_")] == [2] * 6


def test_demo_world_compare_questions(tmp_path: Path) -> None:
    """The demo world's two-image questions are true of their scenes, balanced, and asked with both images."""
    from vistune.demo.world import build_world
    from vistune.eval.tasks.demo import DemoTask

    counts = build_world(tmp_path, {"train": 4, "test": 30}, seed=0, compare={"test": 40})
    assert counts["test"]["compare_questions"] == 40 and "compare_questions" not in counts["train"]
    ann = tmp_path / "annotations"
    instances = json.loads((ann / "instances_test.json").read_text())
    circle_ids = {c["id"] for c in instances["categories"] if c["supercategory"] == "circle"}
    circles: dict[int, int] = {im["id"]: 0 for im in instances["images"]}
    for a in instances["annotations"]:
        circles[a["image_id"]] += a["category_id"] in circle_ids
    questions = json.loads((ann / "compare_test.json").read_text())["questions"]
    for q in questions:
        first, second = (circles[i] for i in q["image_ids"])
        assert first != second and q["answer"] == ("first" if first > second else "second")
    n_first = sum(q["answer"] == "first" for q in questions)
    assert 10 <= n_first <= 30  # drawn evenly

    items = DemoTask(per_type=5).load(tmp_path)
    compare = [it for it in items if it.meta["question"].type == "compare"]
    # 5 // 2 per answer (first, second), each asked with the images and blind
    assert len(compare) == 2 * 2 * (5 // 2) and all(len(it.images) == 2 for it in compare)


def test_precheck_counts_anyres_lengths_the_same_in_worker_processes(llama_dir: Path, dataset_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Exact lengths from the image headers, serially and in a process pool (the layout travels along)."""
    from vistune.chat.encode import ChatEncoder
    from vistune.chat.formats import get_format
    from vistune.data.dataset import sample_image_tokens
    from vistune.data.precheck import precheck
    from vistune.model.llm import load_tokenizer
    from vistune.model.tiling import ImageLayout

    samples = load_samples(two_image_data(dataset_dir, tmp_path), dataset_dir / "images", False, Problems())
    encoder = ChatEncoder(load_tokenizer(llama_dir), get_format("chat_template"), 16, 1024)
    layout = ImageLayout.build("anyres", 32, 8, 16)
    _, serial = precheck(samples, encoder, False, Problems(), layout=layout)
    _, pooled = precheck(samples, encoder, False, Problems(), workers=2, pool_min=4, layout=layout)
    _, single = precheck(samples, encoder, False, Problems())
    assert serial == pooled
    for s, n_any, n_single in zip(samples, serial, single):
        extra = sum(sample_image_tokens(layout, s) or []) - 16 * len(s.images)
        assert abs(n_any) - abs(n_single) == extra  # only the image runs differ, by the counted tokens


def test_hd_global_tile_follows_image_preprocess(clip_dir: Path) -> None:
    from PIL import Image

    from vistune.model.tiling import ImageLayout, ImagePreprocessor
    from vistune.model.vision import load_image_processor

    layout = ImageLayout.build("hd", 32, 8, 16, hd_grid=(1, 2))
    image = Image.new("RGB", (64, 32), (200, 30, 30))
    processor = load_image_processor(clip_dir)
    pad, _ = ImagePreprocessor(layout, processor, "pad")([image])
    crop, _ = ImagePreprocessor(layout, processor, "processor")([image])
    assert pad.shape == crop.shape == (3, 3, 32, 32)  # global + 1x2 tiles
    assert not torch.equal(pad[0], crop[0]) and torch.equal(pad[1:], crop[1:])  # only the global tile differs
