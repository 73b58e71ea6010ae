"""Several images per sample, and training with the hd / anyres image modes, end to end on tiny models.

The data: records with two images each ("Which image shows a red shape? ... The first."), plus the
single-image fixture records, so batches mix one- and two-image samples of different sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vistune.chat.formats import Message
from vistune.cli import main
from vistune.config import load_config
from vistune.data.records import Problems, load_samples
from vistune.errors import DataError
from vistune.infer.engine import Engine, Sampling
from vistune.model.checkpoint import load_checkpoint
from vistune.train.loop import train_stage


def _two_image_data(dataset_dir: Path, out: Path, bad: bool = False, singles: bool = True) -> Path:
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


def _config(clip_dir: Path, llama_dir: Path, data: Path, images: Path, out: Path, skip: bool = False,
            **extra: object):
    vision = {"path": str(clip_dir), **extra.pop("vision", {})}  # type: ignore[dict-item]
    data_cfg = {"path": str(data), "image_folder": str(images), "on_bad_sample": "skip" if skip else "error"}
    stage = {"parts": {"projector": "full", "llm": "full"}, "data": data_cfg,
             "format": "chat_template", "output_dir": str(out), "max_steps": 3, "global_batch_size": 4,
             "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32", "tensorboard": False, **extra}
    return load_config(data={"model": {"vision": vision, "llm": {"path": str(llama_dir)}, "projector": "mlp2x_gelu"},
                             "stages": {"finetune": stage}})


def test_placeholder_count_mismatch_is_rejected_with_the_id(dataset_dir: Path, tmp_path: Path) -> None:
    data = _two_image_data(dataset_dir, tmp_path, bad=True)
    with pytest.raises(DataError, match="record pair_bad: 1 <image> placeholder"):
        load_samples(data, dataset_dir / "images", skip_bad=False, problems=Problems())
    problems = Problems()
    samples = load_samples(data, dataset_dir / "images", skip_bad=True, problems=problems)
    assert problems.counts == {"image/placeholder mismatch": 1}
    assert [len(s.images) for s in samples if s.id.startswith("pair_")] == [2] * 6


@pytest.mark.parametrize("mode", ["single", "anyres", "hd"])
def test_train_and_chat_with_two_images(mode: str, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _two_image_data(dataset_dir, tmp_path)
    vision = {"image_mode": mode, "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]]} if mode == "anyres" else {
        "image_mode": mode}
    cfg = _config(clip_dir, llama_dir, data, dataset_dir / "images", tmp_path / "out", vision=vision)
    out = train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    metrics = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics)  # finite

    bundle = load_checkpoint(out)
    assert bundle.spec.vision.image_mode == mode
    engine = Engine(bundle)
    images = [dataset_dir / "images" / "img_0.png", dataset_dir / "images" / "img_3.png"]
    question = [Message("user", "<image>\n<image>\nWhich image shows the shape on the left?")]
    prompt = engine.prepare(question, images)
    n_slots = sum(1 for t in prompt.input_ids if t < 0)
    assert prompt.image_sizes is not None
    assert n_slots == sum(bundle.model.layout.num_tokens(*hw) for hw in prompt.image_sizes.tolist())
    batch = engine._batch([prompt])
    swapped = engine._batch([engine.prepare(question, images[::-1])])
    with torch.no_grad():
        a, b = engine.model(**batch).logits[0, -1], engine.model(**swapped).logits[0, -1]
    assert not torch.allclose(a, b)  # both images reach the model, in their order
    assert isinstance(engine.chat(question, images, Sampling(max_new_tokens=6)), str)

    # The CLI takes several images too.
    assert main(["ask", str(out), "Which image shows the shape on the left?", "--image", str(images[0]),
                 "--image", str(images[1]), "--max-new-tokens", "4"]) == 0
    assert "loaded" not in capsys.readouterr().err  # it ran to the end (the reply itself may be empty)

    if mode == "anyres":  # serving: two image parts in one OpenAI message reach the model, in order
        _serve_two_images(engine, images, n_slots)


def _serve_two_images(engine: Engine, images: list[Path], n_slots: int) -> None:
    import base64

    import openai
    from servers import serving

    from vistune.serve.api import create_app

    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p.read_bytes())
                                                 .decode()}} for p in images]
    parts.append({"type": "text", "text": "Which image shows the shape on the left?"})
    with serving(lambda _: create_app(engine, "m")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}],
                                               max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens > n_slots  # both images' tokens + the text
    assert isinstance(reply.choices[0].message.content, str)


def test_image_token_budget_error_and_skip(clip_dir: Path, llama_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """anyres 2x2 tiles: each image pair takes 124-160 tokens (by aspect ratio), over a budget of 100."""
    data = _two_image_data(dataset_dir, tmp_path, singles=False)  # pairs + text-only records
    vision = {"image_mode": "anyres", "image_grid_pinpoints": [[64, 64]]}
    cfg = _config(clip_dir, llama_dir, data, dataset_dir / "images", tmp_path / "a", vision=vision,
                  model_max_length=100)
    # 40x28 + 24x36 images: (16 + 6 * 9) + (16 + 8 * 7) tokens after unpadding, newlines included
    with pytest.raises(DataError, match=r"sample pair_0: its 2 image\(s\) take 142 tokens \(\[70, 72\]\), more than "
                                        r"model_max_length=100"):
        train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    cfg = _config(clip_dir, llama_dir, data, dataset_dir / "images", tmp_path / "b", vision=vision,
                  model_max_length=100, max_steps=1, skip=True)
    train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    report = json.loads((tmp_path / "b" / "skipped.json").read_text())
    assert report["counts"] == {"image tokens over model_max_length": 6}


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

    samples = load_samples(_two_image_data(dataset_dir, tmp_path), dataset_dir / "images", False, Problems())
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
