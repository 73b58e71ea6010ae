"""CUDA paths: a bf16 stage on the GPU and inference in bf16 there. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vistune
from vistune.config import load_config
from vistune.infer.engine import Sampling
from vistune.train.loop import train_stage


@pytest.mark.gpu
def test_bf16_finetune_and_ask_on_cuda(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
        "stages": {"ft": {
            "parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "output_dir": str(tmp_path / "ft"), "max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2,
            "lr": 1e-3, "precision": "bf16", "gradient_checkpointing": True, "tensorboard": False,
        }},
    })
    assert train_stage(cfg.model, cfg.stages["ft"], "ft") == tmp_path / "ft"
    engine = vistune.load(str(tmp_path / "ft"), device="cuda")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    answer = engine.ask(dataset_dir / "images" / "img_0.png", "What colour is the shape?", Sampling(max_new_tokens=4))
    assert isinstance(answer, str)
