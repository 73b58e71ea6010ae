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


#: Every command and subcommand, with options its --help must name (a flag from its signature, one from
#: each option group it takes).
HELP = {
    (): ["train", "datagen", "merge-lora", "eval"],
    ("train",): ["CONFIG", "KEY=VALUE", "--stage", "--dry-run", "--processes", "--allow-config-change"],
    ("data",): ["show"],
    ("data", "show"): ["--stage", "--limit", "--json"],
    ("ask",): ["MODEL", "QUESTION", "--image", "--max-new-tokens", "--temperature", "--vision", "--device"],
    ("chat",): ["MODEL", "--image", "--top-p", "--seed", "--base"],
    ("info",): ["MODEL", "--vision", "--llm", "--base"],
    ("convert",): ["SRC", "DST", "--to", "--keep-adapter", "--format", "--dtype", "--vision"],
    ("merge-lora",): ["SRC", "DST", "--base", "--vision"],
    ("datagen",): ["instruct", "align", "convert", "mix", "scienceqa"],
    ("datagen", "instruct"): ["--teacher", "--price", "--jsonl", "--captions", "--instances", "--reask"],
    ("datagen", "align"): ["--np-filter", "--min-np-count", "--jsonl"],
    ("datagen", "convert"): ["LAYOUT", "--questions", "--box-frame", "--max-turns"],
    ("datagen", "mix"): ["FILE[:RATIO]", "--out", "--seed"],
    ("datagen", "scienceqa"): ["ROOT", "--split", "--prompt-format"],
    ("serve",): ["--port", "--api-key", "--ui", "--dtype", "--chat-template", "--max-batch-size", "--allow-image-host",
                 "--max-decode-pixels", "--request-timeout-s", "--limit-concurrency", "--log-level"],
    ("ui",): ["--port", "--api-key", "--max-batch-size", "--max-body-mb"],
    ("demo",): ["--out", "--llm", "--seed", "--size", "--config"],
    ("eval",): ["TASKS", "--tasks", "--model", "--data", "--out", "--judge", "--option", "--llm"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda cmd: " ".join(cmd) or "vistune")
def test_help_for_every_command(cmd: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {' '.join(('vistune', *cmd))} " in out
    missing = [name for name in HELP[cmd] if name not in out]
    assert not missing, f"vistune {' '.join(cmd)} --help does not name {missing}"


def test_every_command_has_its_help_test() -> None:
    from vistune.cli import COMMANDS

    def names(table: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        found = {prefix}
        for name, target in table.items():
            found |= names(target, (*prefix, name)) if isinstance(target, dict) else {(*prefix, name)}
        return found

    assert names(COMMANDS) == set(HELP)


def test_serving_limits_have_one_default() -> None:
    """serve and ui read their limits from the one ServingLimits: ui's batch was 8 beside serve's 32."""
    from vistune.cli import parse
    from vistune.serve.limits import ServingLimits

    serve_call, ui_call = parse(["serve", "m"]), parse(["ui", "m"])
    assert serve_call.keywords["limits"] == ui_call.keywords["limits"] == ServingLimits()
    limits = parse(["ui", "m", "--max-batch-size", "4", "--allow-image-host", "A.example",
                    "--allow-image-host", "b.example", "--max-body-mb", "1"]).keywords["limits"]
    assert limits.max_batch_size == 4 and limits.request_limits().allowed_image_hosts == ("a.example", "b.example")
    assert limits.request_limits().max_body_bytes == 1024 * 1024
    assert ServingLimits().request_limits().max_decode_pixels == 4 * 4096 * 4096


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


def test_chat_is_multi_turn_and_reset_starts_over(tiny_checkpoint: Path, dataset_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The second turn sees the first; after /reset, a turn is answered as the first of a new chat."""
    from vistune.chat.formats import Message
    from vistune.data.dataset import load_image

    img = dataset_dir / "images" / "img_0.png"
    first, second = "What colour is the shape?", "And the background?"
    engine, sampling = vistune.load(str(tiny_checkpoint)), Sampling(max_new_tokens=5)
    images = [load_image(img, "img")]

    def answer(*turns: str) -> str:
        """The reply to the last turn, the earlier ones answered as the model does."""
        history: list[Message] = []
        for i, turn in enumerate(turns):
            history.append(Message("user", ("<image>\n" if i == 0 else "") + turn))
            history.append(Message("assistant", engine.generate([history], [images], sampling)[0].strip()))
        return history[-1].content

    fresh, continued = answer(first), answer(first, second)
    after_reset = answer(second)
    assert continued != after_reset  # else this test could not tell a reset from none
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n/reset\n{second}\n\n"))
    assert main(["chat", str(tiny_checkpoint), "--image", str(img), "--max-new-tokens", "5"]) == 0
    replies = [line.removeprefix("assistant> ") for line in capsys.readouterr().out.split("you> ")
               if line.startswith("assistant> ")]
    assert [r.strip() for r in replies] == [fresh, continued, after_reset]


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
