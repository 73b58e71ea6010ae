"""Data problems met during a training run: a bomb image and a torn JSONL line are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

from data_files import bomb_png


def rec(**kw):
    base = {"id": "r1", "image": "img_0.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    base.update(kw)
    return base


def test_training_skips_and_counts_a_bomb_image_and_a_broken_line(tmp_path: Path, dataset_dir: Path, clip_dir: Path,
                                                                 llama_dir: Path) -> None:
    import shutil

    from vistune.config import load_config
    from vistune.train.loop import train_stage

    images = tmp_path / "images"
    shutil.copytree(dataset_dir / "images", images)
    bomb_png(images / "bomb.png")
    records = json.loads((dataset_dir / "train.json").read_text())[:7] + [rec(id="bomb", image="bomb.png")]
    lines = [json.dumps(r) for r in records]
    broken = '{"id": "torn", "conversations": [{"fr'  # a line cut short
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:3] + [broken] + lines[3:]) + "\n")
    stage = {"data": {"path": str(tmp_path / "d.jsonl"), "image_folder": str(images), "on_bad_sample": "skip"},
             "format": "chat_template", "output_dir": str(tmp_path / "out"), "max_steps": 2, "global_batch_size": 4,
             "micro_batch_size": 4, "lr": 1e-3, "precision": "fp32", "warmup_ratio": 0.0, "tensorboard": False,
             "save_frozen": False}
    cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)},
                                      "projector": "mlp2x_gelu"}, "stages": {"s": stage}})
    train_stage(cfg.model, cfg.stages["s"], "s")  # two steps of four cover all eight samples
    report = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert report["counts"] == {"invalid JSON line": 1, "image over the decompression-bomb limit": 1}
