"""Packing through train_stage: a packed stage trains like a padded one (loss curves and final weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def test_a_packed_stage_trains_like_an_unpacked_one(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                     dataset_dir: Path) -> None:
    """Through `train_stage`: each step takes the whole data set (16 samples), packed into a few rows or
    padded one per row; the loss curves and the final weights agree."""
    from safetensors.torch import load_file

    from vistune.config import load_config
    from vistune.train.loop import train_stage

    def stage(out: Path, **data) -> dict:
        return {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template", "model_max_length": 128,
                "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images"), **data},
                "output_dir": str(out), "max_steps": 3, "global_batch_size": 16, "micro_batch_size": 4, "lr": 1e-3,
                "precision": "fp32", "warmup_ratio": 0.0, "tensorboard": False, "save_frozen": False}

    model = {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}}
    cfg = load_config(data={"model": model, "stages": {
        "padded": stage(tmp_path / "padded"), "packed": stage(tmp_path / "packed", packing=True, pack_length=256)}})
    curves = {}
    for name in ("padded", "packed"):
        train_stage(cfg.model, cfg.stages[name], name)
        curves[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(curves["packed"]) == 3
    for a, b in zip(curves["padded"], curves["packed"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # the same tokens were attended, with no padding counted
    assert [r["tokens_per_s"] > 0 for r in curves["packed"]] == [True] * 3
    wa = load_file(str(tmp_path / "padded" / "projector.safetensors"))
    wb = load_file(str(tmp_path / "packed" / "projector.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
