"""LLaVA-1.5 fidelity through a training run: each stage feeds the tower its own preprocessing and saves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import Message
from vistune.config import load_config
from vistune.model.checkpoint import read_spec
from vistune.model.vision import VisionTower, load_image_processor, preprocess_images


def test_each_stage_feeds_the_tower_its_own_preprocessing(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Align with `processor` (resize + centre crop), finetune with `pad`, on one wide image whose sides
    differ in colour: the tower must receive exactly each mode's pixels, and each saved model records its own.
    The record asks its question before the image: training must see the image moved to the front."""
    from vistune.train.loop import run

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (48, 0, 64, 32))  # a blue strip on the right, cropped away by centre crop
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "wide.png")
    record = {"id": "wide", "image": "wide.png", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "a red and blue picture"}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    seen: list[torch.Tensor] = []
    forward = VisionTower.forward

    def recording(self: VisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
        seen.append(pixel_values.detach().clone())
        return forward(self, pixel_values)

    monkeypatch.setattr(VisionTower, "forward", recording)
    encoded: list[str] = []
    encode = ChatEncoder.encode

    def recording_encode(self: ChatEncoder, messages: list[Message], *args: object, **kw: object) -> object:
        encoded.append(messages[0].content)
        return encode(self, messages, *args, **kw)

    monkeypatch.setattr(ChatEncoder, "encode", recording_encode)
    common = {"data": {"path": str(tmp_path / "data.json"), "image_folder": str(tmp_path / "images"),
                       "precheck": False}, "max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1,
              "lr": 1e-3, "precision": "fp32", "tensorboard": False}
    stages = {
        "align": {**common, "format": "plain", "image_preprocess": "processor", "output_dir": str(tmp_path / "a")},
        "finetune": {**common, "format": "vicuna_v1", "output_dir": str(tmp_path / "f"),
                     "projector_from": str(tmp_path / "a"), "parts": {"projector": "full", "llm": "full"}},
    }
    cfg = load_config(data={"model": {"vision": {"path": str(clip_dir), "image_preprocess": "pad"},
                                      "llm": {"path": str(llama_dir)}}, "stages": stages})
    run(cfg)
    processor = load_image_processor(clip_dir)
    cropped, padded = preprocess_images([image], processor, "processor"), preprocess_images([image], processor, "pad")
    assert not torch.allclose(cropped, padded)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], cropped, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], padded, rtol=0, atol=0)
    assert encoded and set(encoded) == {"<image>\nWhat is it?"}
    assert read_spec(tmp_path / "a").vision.image_preprocess == "processor"
    assert read_spec(tmp_path / "f").vision.image_preprocess == "pad"
