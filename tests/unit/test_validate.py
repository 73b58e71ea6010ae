"""Every stage checked before the first starts (issue 22 item 3), `vistune train --dry-run`, the
documented launch commands, and `vistune data show`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from vistune.cli import main
from vistune.config import load_config
from vistune.errors import ConfigError
from vistune.train import validate
from vistune.train.validate import check_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LLAVA_15_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions.")


def tiny_overrides(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> list[str]:
    overrides = [f"model.vision.path={clip_dir}", f"model.llm.path={llama_dir}"]
    for st, data in (("align", "align.json"), ("finetune", "train.json")):
        overrides += [f"stages.{st}.data.path={dataset_dir / data}",
                      f"stages.{st}.data.image_folder={dataset_dir / 'images'}",
                      f"stages.{st}.output_dir={tmp_path / st}", f"stages.{st}.max_steps=2",
                      f"stages.{st}.tensorboard=false"]
    return [*overrides, f"stages.finetune.projector_from={tmp_path / 'align'}"]


def test_a_stage_2_problem_stops_the_run_before_stage_1_trains(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                               dataset_dir: Path) -> None:
    from vistune.train.loop import run

    overrides = [*tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir),
                 f"stages.finetune.data.path={tmp_path / 'missing.json'}"]
    with pytest.raises(ConfigError, match=r"\[finetune\] data.path: .*missing.json does not exist"):
        run(load_config(CONFIGS / "tiny-cpu.yaml", overrides))
    assert not (tmp_path / "align").exists(), "stage 1 ran before stage 2's problem was reported"


def test_every_problem_is_listed_with_its_stage() -> None:
    cfg = load_config(CONFIGS / "llava-1.5-7b.yaml", [
        "stages.finetune.output_dir=runs/llava-1.5-7b/align",
        "stages.finetune.parts.projector=frozen", "stages.finetune.projector_from=null"])
    with pytest.raises(ConfigError) as e:
        check_run(cfg, 16, check_files=False)
    message = str(e.value)
    for expected in (
        "[align] global_batch_size 256 is not a multiple of micro_batch_size 32 x 16 processes = 512; "
        "e.g. stages.align.micro_batch_size=16",
        "[finetune] global_batch_size 128 is not a multiple of micro_batch_size 16 x 16 processes = 256",
        "[finetune] parts.projector is frozen but no projector_from is given",
        "[finetune] output_dir runs/llava-1.5-7b/align is also stage align's",
    ):
        assert expected in message
    assert "4 problem(s)" in message
    check_run(load_config(CONFIGS / "llava-1.5-7b.yaml"), 8, check_files=False)  # the preset as is: fine on 8


def test_engine_refusals_are_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an engine refuses is one table entry: zero3 + save_every resumes now (DeepSpeed's own state), and an
    entry added back is reported for launched runs only."""
    cfg = load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.finetune.distributed=zero3"])
    check_run(cfg, 8, check_files=False)
    monkeypatch.setattr(validate, "ENGINE_REFUSES", {**validate.ENGINE_REFUSES, "zero3": {"save_every": "because"}})
    with pytest.raises(ConfigError, match=r"\[finetune\] save_every is set but distributed: zero3 refuses it: because"):
        check_run(cfg, 8, check_files=False)
    check_run(cfg, 1, check_files=False)  # one process, no launcher: the engine does not apply


def _documented_launches() -> list[tuple[str, str]]:
    """(where, command) for every `vistune train` launch written in the README, docs/ and the accelerate presets."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((CONFIGS / "accelerate").glob("*.yaml"))]
    found = []
    for path in sources:
        text = path.read_text()
        if path.suffix == ".yaml":  # commands live in comments
            text = "\n".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
        for line in text.splitlines():
            line = line.strip().strip("`")
            if re.match(r"(torchrun|accelerate launch|vistune train) ", line) and re.search(r"train configs/\S+\.yaml",
                                                                                            line):
                found.append((path.name, line.split(" #")[0].split("`")[0].strip()))
    return found


def _processes(words: list[str]) -> int:
    def value(flag: str, default: int) -> int:
        names = (flag, flag.replace("_", "-"))
        return next((int(words[i + 1]) for i, w in enumerate(words[:-1]) if w in names), default)

    if words[0] == "torchrun":
        return value("--nproc_per_node", 1) * value("--nnodes", 1)
    if words[0] == "accelerate":
        config = words[words.index("--config_file") + 1]
        return int(yaml.safe_load((ROOT / config).read_text())["num_processes"])
    return value("--processes", 1)


def test_documented_launch_commands_are_valid() -> None:
    launches = _documented_launches()
    assert len(launches) >= 8, launches  # the commands of the README, docs/ and the presets were all found
    for where, command in launches:
        words = shlex.split(command.replace("$", ""))
        config = next(w for w in words if re.fullmatch(r"configs/\S+\.yaml", w) and "accelerate" not in w)
        overrides = [w for w in words[words.index(config) + 1:] if "=" in w and not w.startswith("-")]
        cfg = load_config(ROOT / config, overrides)
        try:
            check_run(cfg, _processes(words), check_files=False)
        except ConfigError as e:
            pytest.fail(f"{where}: `{command}` fails its check: {e}")


def test_dry_run_checks_prints_and_trains_nothing(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                  dataset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir)
    assert main(["train", str(CONFIGS / "tiny-cpu.yaml"), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the printed config is YAML, comments included
    assert resolved["stages"]["finetune"]["lr"] == 1e-4 and resolved["stages"]["align"]["tf32"] is True
    assert "# [align] 8 = 4 per process x 1 x 2 accumulation steps" in out and "nothing trained" in out
    assert not (tmp_path / "align").exists() and not (tmp_path / "finetune").exists()
    assert main(["train", str(CONFIGS / "tiny-cpu.yaml"), "--dry-run", "--processes", "8", *overrides]) == 2
    assert "[align] global_batch_size 8 is not a multiple of micro_batch_size 4 x 8 processes" in capsys.readouterr().err


def test_data_show_json_and_marked(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir), "stages.finetune.format=vicuna_v1"]
    assert main(["data", "show", str(CONFIGS / "tiny-cpu.yaml"), "--stage", "finetune", "--limit", "2", "--json",
                 *overrides]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = json.loads((dataset_dir / "train.json").read_text())[:2]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    first = records[0]["conversations"]
    assert rows[0]["text"] == (f"{LLAVA_15_SYSTEM} USER: {first[0]['value']} ASSISTANT: {first[1]['value']}<|im_end|>"
                               f"USER: {first[2]['value']} ASSISTANT: {first[3]['value']}<|im_end|>")
    assert rows[0]["supervised"] == [f" {first[1]['value']}<|im_end|>", f" {first[3]['value']}<|im_end|>"]
    assert main(["data", "show", str(CONFIGS / "tiny-cpu.yaml"), "--stage", "align", "--limit", "1", *overrides]) == 0
    out = capsys.readouterr().out
    caption = json.loads((dataset_dir / "align.json").read_text())[0]["conversations"][1]["value"]
    assert f"<image>\u27e6{caption}<|im_end|>\u27e7" in out
    assert not (tmp_path / "align").exists() and not (tmp_path / "finetune").exists()


def test_data_show_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["data", "show", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out


def test_a_launched_run_checks_what_each_engine_needs(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                      dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage-2 engine this machine cannot run (FSDP without CUDA, ZeRO without deepspeed) is named before
    stage 1 starts, not when stage 2 builds its Accelerator."""
    import importlib.util

    import torch

    overrides = tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir)
    monkeypatch.setenv("WORLD_SIZE", "1")
    if not torch.cuda.is_available():
        cfg = load_config(CONFIGS / "tiny-cpu.yaml", [*overrides, "stages.finetune.distributed=fsdp"])
        with pytest.raises(ConfigError, match=r"\[finetune\] distributed: fsdp runs on GPUs only"):
            check_run(cfg, 1)
    if importlib.util.find_spec("deepspeed") is None:
        cfg = load_config(CONFIGS / "tiny-cpu.yaml", [*overrides, "stages.finetune.distributed=zero2",
                                                       "stages.finetune.save_every=null"])
        with pytest.raises(ConfigError, match=r"\[finetune\] distributed: zero2 needs DeepSpeed: pip install"):
            check_run(cfg, 1)
    check_run(load_config(CONFIGS / "tiny-cpu.yaml", overrides), 1)  # ddp: nothing to check


def test_a_finished_stage_needs_no_data(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    """The loop skips a stage whose output is complete, so its deleted data must not stop the rerun."""
    overrides = [*tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir),
                 f"stages.align.data.path={tmp_path / 'deleted.json'}"]
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", overrides)
    with pytest.raises(ConfigError, match="deleted.json does not exist"):
        check_run(cfg, 1)
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "vistune.json").write_text("{}")
    check_run(cfg, 1)


def test_chat_template_stage_needs_a_tokenizer_with_one(tmp_path: Path, clip_dir: Path, llama_spm_dir: Path,
                                                        llama_dir: Path, dataset_dir: Path) -> None:
    """tiny-cpu's finetune renders with the tokenizer's template: an LLM without one is named before align runs."""
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(str(llama_spm_dir)).chat_template:
        pytest.skip("the sentencepiece fixture has a chat template")
    overrides = tiny_overrides(tmp_path, clip_dir, llama_dir, dataset_dir)
    check_run(load_config(CONFIGS / "tiny-cpu.yaml", overrides), 1)  # the BPE fixture has one
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", [*overrides, f"model.llm.path={llama_spm_dir}"])
    with pytest.raises(ConfigError, match=r"\[finetune\] format: chat_template, but the tokenizer in .* has no chat"):
        check_run(cfg, 1)
