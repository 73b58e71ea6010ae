"""What a training run records and how it survives: truncation counts, the resolved config and versions,
saves on signals and by the clock, resume fingerprints, stale temp folders, image checks in the precheck,
trackers, held-out loss, and stage references in projector_from."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vistune.config import load_config
from vistune.errors import ConfigError, DataError
from vistune.train.loop import run, train_stage


def _stage(data_dir: Path, out: Path, **kw) -> dict:
    base = {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
            "data": {"path": str(data_dir / "train.json"), "image_folder": str(data_dir / "images")},
            "output_dir": str(out), "max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
            "precision": "fp32", "warmup_ratio": 0.0, "report_to": [], "save_frozen": False}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return base


def _cfg(clip_dir: Path, llama_dir: Path, stages: dict, overrides: list[str] | None = None):
    data = {"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}}, "stages": stages}
    return load_config(data=data, overrides=overrides)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _records(dataset_dir: Path) -> list[dict]:
    return json.loads((dataset_dir / "train.json").read_text())


# 21.2 ------------------------------------------------------------------------------------------------

def _with_long_second_turn(dataset_dir: Path, tmp_path: Path) -> Path:
    """Record 0 gets a second round whose reply cannot fit in 96 tokens; its first reply does."""
    records = _records(dataset_dir)
    records[0]["conversations"] = records[0]["conversations"][:2] + [
        {"from": "human", "value": "Tell me everything."}, {"from": "gpt", "value": " ".join(["blue red"] * 80)}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_partly_truncated_samples_are_counted_and_can_be_dropped(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                                 dataset_dir: Path, mode: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    data = _with_long_second_turn(dataset_dir, tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, model_max_length=96,
                                                 data={"path": str(data), "on_truncated": mode})})
    train_stage(cfg.model, cfg.stages["s"], "s")
    if mode == "keep":
        report = json.loads((out / "truncated.json").read_text())
        assert report["total"] == 1 and report["samples"][0].startswith("sample 000000: ")
        assert "1 samples lost some reply tokens" in capsys.readouterr().out
        assert not (out / "skipped.json").exists()
    else:
        report = json.loads((out / "skipped.json").read_text())
        assert report["counts"] == {"some reply tokens truncated": 1}
        assert not (out / "truncated.json").exists()


# 21.3 ------------------------------------------------------------------------------------------------

def test_output_folder_holds_the_resolved_config_and_versions(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                              dataset_dir: Path) -> None:
    stages = {"align": _stage(dataset_dir, tmp_path / "a", format="plain", parts={"llm": "frozen"}, max_steps=1,
                              data={"path": str(dataset_dir / "align.json")}),
              "ft": _stage(dataset_dir, tmp_path / "f", projector_from="align", max_steps=1)}
    cfg = _cfg(clip_dir, llama_dir, stages, overrides=["stages.ft.lr=3e-4"])
    run(cfg)
    written = yaml.safe_load((tmp_path / "f" / "config.yaml").read_text())
    stage = written["stages"]["ft"]
    assert stage["lr"] == 3e-4 and stage["weight_decay"] == 0.0 and stage["lora"]["r"] == 128  # overrides, defaults
    assert stage["projector_from"] == str(tmp_path / "a")  # the stage name resolved to its folder
    assert load_config(tmp_path / "f" / "config.yaml").stages["ft"] == cfg.resolved().stages["ft"]  # it runs as is
    versions = json.loads((tmp_path / "f" / "versions.json").read_text())
    import accelerate, peft, torch, transformers  # noqa: E401

    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert (versions["transformers"], versions["peft"], versions["accelerate"]) == (
        transformers.__version__, peft.__version__, accelerate.__version__)
    assert versions["python"] == ".".join(map(str, sys.version_info[:3])) and "vistune" in versions
    assert "vistune_git" in versions


# 21.5 ------------------------------------------------------------------------------------------------

def _cli_env() -> dict:
    src = str(Path(__file__).parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                                   dataset_dir: Path) -> None:
    """A cluster preempting the job (SIGTERM) mid-run: it saves at the step boundary, says where and how to
    resume, exits 128+15; the same command then continues from that step to the end."""
    out = tmp_path / "out"
    cfg = {"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
           "stages": {"s": _stage(dataset_dir, out, max_steps=60)}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "vistune.cli", "train", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and len(_rows(out)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1, stderr[-2000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 3 <= step < 60
    assert f"stopped by SIGTERM at step {step}: saved {checkpoints[0]}; run the same command again" in stderr
    again = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoints[0]} (step {step}/60)" in again.stdout + again.stderr
    assert [r["step"] for r in _rows(out)] == list(range(1, 61))
    assert (out / "vistune.json").is_file()


# 17.6 and 17.12 --------------------------------------------------------------------------------------

def test_resume_under_another_config_stops_listing_the_differences(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                                    dataset_dir: Path) -> None:
    out = tmp_path / "out"
    first = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, stop_after_steps=2)})
    assert train_stage(first.model, first.stages["s"], "s") is None
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps(_records(dataset_dir)[:10]))
    changed = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, lr=2e-3, lr_schedule="linear",
                                                     data={"path": str(other_data)})})
    with pytest.raises(ConfigError) as err:
        train_stage(changed.model, changed.stages["s"], "s")
    message = str(err.value)
    for line in ("stage.lr: 0.001 -> 0.002", "stage.lr_schedule: 'cosine' -> 'linear'", "data.samples: 16 -> 10",
                 "--allow-config-change", "stages.s.resume=false"):
        assert line in message, message
    # unchanged apart from what does not shape the run (logging, saving, workers): resumes
    same = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, log_every=2, save_every=3)})
    assert train_stage(same.model, same.stages["s"], "s") == out
    assert [r["step"] for r in _rows(out)] == [1, 2, 4]


def test_allow_config_change_resumes_anyway(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                            dataset_dir: Path) -> None:
    out = tmp_path / "out"
    first = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, stop_after_steps=2)})
    train_stage(first.model, first.stages["s"], "s")
    changed = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, lr=2e-3)})
    assert train_stage(changed.model, changed.stages["s"], "s", allow_config_change=True) == out
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_stale_temp_checkpoints_are_removed_on_start(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                     dataset_dir: Path) -> None:
    """What a kill -9 during a checkpoint save leaves behind."""
    out = tmp_path / "out"
    stale = out / "checkpoints" / ".tmp-abc123"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"\0" * 1024)
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=1)})
    train_stage(cfg.model, cfg.stages["s"], "s")
    assert not stale.exists() and (out / "vistune.json").is_file()


# 21.6 ------------------------------------------------------------------------------------------------

def _corrupt(dataset_dir: Path, tmp_path: Path, names: list[str]) -> Path:
    """A copy of the images where `names` are cut-off JPEGs (their header reads, their pixels do not)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for p in (dataset_dir / "images").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    for name in names:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
        (folder / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return folder


def test_verify_images_finds_a_corrupt_image_before_training(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                             dataset_dir: Path) -> None:
    images = _corrupt(dataset_dir, tmp_path, ["img_3.png"])
    out = tmp_path / "out"
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, data={"image_folder": str(images),
                                                                        "verify_images": True})})
    with pytest.raises(DataError, match=r"sample 000003: image .*img_3.png cannot be read .*on_bad_sample=skip"):
        train_stage(cfg.model, cfg.stages["s"], "s")
    assert not (out / "metrics.jsonl").exists()  # before the first step


def test_a_bad_image_found_by_the_loader_says_how_to_skip_it(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                            dataset_dir: Path) -> None:
    images = _corrupt(dataset_dir, tmp_path, ["img_3.png"])
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, tmp_path / "out", max_steps=8,
                                                 data={"image_folder": str(images)})})
    with pytest.raises(DataError, match=r"img_3.png cannot be read .*on_bad_sample=skip.*verify_images=true"):
        train_stage(cfg.model, cfg.stages["s"], "s")


def test_a_bad_image_met_in_every_epoch_counts_once(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                    dataset_dir: Path) -> None:
    """Two bad files, three epochs, a resume in between: 2 records skipped, each listed once."""
    images = _corrupt(dataset_dir, tmp_path, ["img_3.png", "img_5.png"])
    out = tmp_path / "out"
    data = {"image_folder": str(images), "on_bad_sample": "skip"}
    first = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=12, stop_after_steps=6, data=data)})
    train_stage(first.model, first.stages["s"], "s")
    rest = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=12, data=data)})
    train_stage(rest.model, rest.stages["s"], "s")
    report = json.loads((out / "skipped.json").read_text())
    assert report["total"] == 2 and report["counts"] == {"unreadable image": 2}
    examples = report["examples"]["unreadable image"]
    assert len(examples) == len(set(examples)) == 2


def test_verify_images_with_skip_counts_each_bad_record_once(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                             dataset_dir: Path) -> None:
    images = _corrupt(dataset_dir, tmp_path, ["img_3.png", "img_5.png"])
    out = tmp_path / "out"
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=8, data={
        "image_folder": str(images), "on_bad_sample": "skip", "verify_images": True})})
    train_stage(cfg.model, cfg.stages["s"], "s")
    assert json.loads((out / "skipped.json").read_text())["counts"] == {"unreadable image": 2}


# 21.9 ------------------------------------------------------------------------------------------------

def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_trackers_log_each_step_once_across_a_resume(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                     dataset_dir: Path) -> None:
    """Steps 3 trained, logged, lost with its checkpoint, trained again after resuming from step 2: TensorBoard
    (the default tracker, through accelerate) holds every step exactly once."""
    out = tmp_path / "out"
    first = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, save_every=2, stop_after_steps=3,
                                                   report_to=["tensorboard"])})
    train_stage(first.model, first.stages["s"], "s")
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000003")  # as if it crashed after logging step 3
    rest = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=4, save_every=2,
                                                  report_to="tensorboard")})
    train_stage(rest.model, rest.stages["s"], "s")
    steps = _tensorboard_steps(out / "tensorboard", "train/loss")
    assert Counter(steps) == {1: 1, 2: 1, 3: 1, 4: 1}, steps
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


# 21.10 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["fraction", "path"])
def test_held_out_loss_is_logged_every_n_steps(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                               source: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    data = {"val_fraction": 0.25} if source == "fraction" else {"val_path": str(dataset_dir / "train.json")}
    cfg = _cfg(clip_dir, llama_dir, {"s": _stage(dataset_dir, out, max_steps=5, val_every=2, data=data)})
    train_stage(cfg.model, cfg.stages["s"], "s")
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(s for s, r in rows.items() if "val_loss" in r) == [2, 4, 5]  # every 2 steps and the last
    assert all(0 < rows[s]["val_loss"] < 20 for s in (2, 4, 5))
    log = capsys.readouterr()
    n_val, n_train = (4, 12) if source == "fraction" else (16, 16)
    assert f"validation: {n_val} held-out samples" in log.out and f"[s] {n_train} samples" in log.out
    assert "val_loss=" in log.err  # in the progress bar


# 21.16 -----------------------------------------------------------------------------------------------


def test_the_cli_passes_allow_config_change() -> None:
    from vistune.cli import parse

    args = parse(["train", "run.yaml", "stages.s.lr=1", "--allow-config-change"]).keywords
    assert args["allow_config_change"] is True and args["overrides"] == ("stages.s.lr=1",)
    assert parse(["train", "run.yaml"]).keywords["allow_config_change"] is False
