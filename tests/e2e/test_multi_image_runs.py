"""Several images per sample through training and serving: train and chat in every image mode, and the image
token budget's error and skip in a training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_files import two_image_data

from vistune.chat.formats import Message
from vistune.cli import main
from vistune.config import load_config
from vistune.errors import DataError
from vistune.infer.engine import Engine, Sampling
from vistune.model.checkpoint import load_checkpoint
from vistune.train.loop import train_stage


def _config(clip_dir: Path, llama_dir: Path, data: Path, images: Path, out: Path, skip: bool = False,
            **extra: object):
    vision = {"path": str(clip_dir), **extra.pop("vision", {})}  # type: ignore[dict-item]
    data_cfg = {"path": str(data), "image_folder": str(images), "on_bad_sample": "skip" if skip else "error"}
    stage = {"parts": {"projector": "full", "llm": "full"}, "data": data_cfg,
             "format": "chat_template", "output_dir": str(out), "max_steps": 3, "global_batch_size": 4,
             "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32", "tensorboard": False, **extra}
    return load_config(data={"model": {"vision": vision, "llm": {"path": str(llama_dir)}, "projector": "mlp2x_gelu"},
                             "stages": {"finetune": stage}})


@pytest.mark.parametrize("mode", ["single", "anyres", "hd"])
def test_train_and_chat_with_two_images(mode: str, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = two_image_data(dataset_dir, tmp_path)
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
    batch = engine.inputs([prompt])
    swapped = engine.inputs([engine.prepare(question, images[::-1])])
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
    data = two_image_data(dataset_dir, tmp_path, singles=False)  # pairs + text-only records
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
