"""The tiny CPU preset runs both its stages end to end on the tiny fixtures."""

from __future__ import annotations

from pathlib import Path

from vistune.config import load_config
from vistune.train.loop import run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_tiny_cpu_preset_runs(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    overrides = [f"model.vision.path={clip_dir}", f"model.llm.path={llama_dir}"]
    for st, data in (("align", "align.json"), ("finetune", "train.json")):
        overrides += [f"stages.{st}.data.path={dataset_dir / data}", f"stages.{st}.data.image_folder={dataset_dir / 'images'}",
                      f"stages.{st}.output_dir={tmp_path / st}", f"stages.{st}.max_steps=3", f"stages.{st}.tensorboard=false"]
    outputs = run(load_config(CONFIGS / "tiny-cpu.yaml", overrides))
    assert set(outputs) == {"align", "finetune"} and (outputs["finetune"] / "vistune.json").is_file()
