"""The command line: ask prints only the answer, chat streams turns, info describes, train takes
overrides, and user errors are one line with exit code 2."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vistune
from vistune.cli import main
from vistune.infer.engine import Sampling


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ([], ["train"], ["ask"], ["chat"], ["info"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    assert "usage: vistune chat" in capsys.readouterr().out


def test_ask_prints_only_the_answer(tiny_checkpoint: Path, dataset_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = dataset_dir / "images" / "img_0.png"
    assert main(["ask", str(tiny_checkpoint), "--image", str(img), "--max-new-tokens", "6",
                 "What colour is the shape?"]) == 0
    out = capsys.readouterr().out
    expected = vistune.load(str(tiny_checkpoint)).ask(img, "What colour is the shape?", Sampling(max_new_tokens=6))
    assert out == expected + "\n"


def test_console_script_ask(tiny_checkpoint: Path, dataset_dir: Path) -> None:
    exe = shutil.which("vistune") or pytest.skip("the vistune console script is not on PATH")
    res = subprocess.run([exe, "ask", str(tiny_checkpoint), "--image", str(dataset_dir / "images" / "img_1.png"),
                          "--max-new-tokens", "6", "What colour is the background?"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 1


def test_chat_is_multi_turn(tiny_checkpoint: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the shape?\n/reset\nAnd the background?\n\n"))
    assert main(["chat", str(tiny_checkpoint), "--image", str(dataset_dir / "images" / "img_0.png"),
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "The" in out


def test_info(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    for expected in ("conversation_format     chat_template", "image_tokens_per_image  16", "projector               mlp2x_gelu",
                     "vision", "llm"):
        assert expected in out


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vistune.json is missing" in err
    cfg = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    assert main(["train", str(cfg), "stages.align.lrr=1"]) == 2
    assert "unknown config field 'stages.align.lrr'" in capsys.readouterr().err
    assert main(["train", str(cfg), "--stage", "pretrain"]) == 2
    assert "unknown stage(s) ['pretrain']; this config has: align, finetune" in capsys.readouterr().err


def test_train_command_with_overrides(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
    args = ["train", str(cfg), "--stage", "align", f"model.vision.path={clip_dir}", f"model.llm.path={llama_dir}",
            f"stages.align.data.path={dataset_dir / 'align.json'}", f"stages.align.data.image_folder={dataset_dir / 'images'}",
            f"stages.align.output_dir={tmp_path / 'align'}", "stages.align.max_steps=2"]
    assert main(args) == 0
    assert f"align: {tmp_path / 'align'}" in capsys.readouterr().out
    assert (tmp_path / "align" / "vistune.json").is_file() and not (tmp_path / "finetune").exists()
