"""Checkpoint folders that are not what they claim: detection of unknown and incomplete folders, .bin files
read as weights only, and `vistune info` on a converted folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistune.cli import main
from vistune.convert.detect import detect
from vistune.convert.weights import load_weight_file
from vistune.errors import CheckpointError


def test_unknown_and_incomplete_folders(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no other format vistune reads was found"):
        detect(tmp_path / "x")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    (lora / "non_lora_trainables.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="without its adapter weights"):
        detect(lora)


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled code ran",))


def test_bin_files_are_loaded_weights_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model.mm_projector.0.weight": _Payload()}, tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_weight_file(tmp_path / "mm_projector.bin")
    assert "unpickled code ran" not in capsys.readouterr().out
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.bin")
    assert torch.equal(load_weight_file(tmp_path / "ok.bin")["a"], torch.ones(2))


def test_info_on_other_formats(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "hf"), "--to", "llava-hf"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    for expected in ("format                  llava-hf", "conversation_format     chat_template",
                     "image_tokens_per_image  16", "projector               mlp2x_gelu, 6,272 parameters"):
        assert expected in out
