"""A mid-run resume checkpoint (`OUTPUT_DIR/checkpoints/step-N`) as a model to ask or evaluate.

A step folder holds only the trainable weights (see `vistune.train.state`), not a description of
the model. The model is rebuilt from the stage's resolved config, `OUTPUT_DIR/config.yaml` (a run
config holding this one stage), exactly as the stage built it (parts, projector_from, LoRA wrapping),
and the step's weights are put in. Paths in it are as the run was given them: relative ones are read
from the current folder, as `vistune train` read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from vistune.config import ModelConfig, RunConfig, StageConfig, load_config
from vistune.errors import CheckpointError, ConfigError
from vistune.files import write_text
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, load_projector
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.train.parts import apply_parts
from vistune.train.state import PROGRESS_FILE, WEIGHTS_FILE

CONFIG_FILE = "config.yaml"


def stage_file(step_folder: Path) -> Path:
    """The resolved config of a step folder's stage: OUTPUT_DIR/config.yaml, two folders up."""
    return step_folder.parent.parent / CONFIG_FILE


def write_stage_file(output_dir: Path, model_cfg: ModelConfig, stage: StageConfig, name: str) -> None:
    """This stage as a runnable config, every default written out, in OUTPUT_DIR (main process)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = RunConfig(model=model_cfg, stages={name: stage}).model_dump(mode="json")
    header = "# written by vistune train: this stage's resolved config\n"
    write_text(output_dir / CONFIG_FILE, header + yaml.safe_dump(resolved, sort_keys=False))


def is_step_checkpoint(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / PROGRESS_FILE).is_file()


def _read_stage(folder: Path) -> tuple[str, ModelConfig, StageConfig]:
    path = stage_file(folder)
    if not path.is_file():
        raise CheckpointError(f"{folder} is a resume checkpoint, but {path} (its stage's resolved config) is "
                              "missing; it was written by an older vistune. Resume the run and let it finish, or "
                              "ask the finished output folder")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: unreadable stage config ({e})") from None
    if len(cfg.stages) != 1:
        raise CheckpointError(f"{path}: expected the one stage that wrote {folder}, found {list(cfg.stages)}")
    (name, stage), = cfg.stages.items()
    return name, cfg.model, stage


def load_step_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """The model of a resume checkpoint, built as its stage built it, with the step's weights (CPU)."""
    name, model_cfg, stage = _read_stage(folder)
    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, dtype, dtype)
    if stage.projector_from:  # a frozen projector is not in the step's trainable weights
        load_projector(model, stage.projector_from, model_cfg.projector)
    apply_parts(model, stage.parts, stage.lora, gradient_checkpointing=False)
    weights = load_file(str(folder / WEIGHTS_FILE))
    unknown = sorted(set(weights) - set(model.state_dict()))
    if unknown:
        raise CheckpointError(f"{folder}: {len(unknown)} weights do not fit the model {stage_file(folder)} describes "
                              f"(first: {unknown[0]}); was the stage config changed after this step was saved?")
    model.load_state_dict(weights, strict=False)  # the frozen rest came from the parts' sources
    model.requires_grad_(False)
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    spec = ModelSpec(vision=model_cfg.vision, llm=model_cfg.llm, projector=model_cfg.projector,
                     vision_hidden_size=model.vision.hidden_size,
                     llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
                     num_image_tokens=model.num_image_tokens, conversation_format=stage.format,
                     system_prompt=stage.system_prompt, model_max_length=stage.model_max_length,
                     provenance={"stage": name, "steps": progress.get("step"), "resume_checkpoint": str(folder)})
    tokenizer = load_tokenizer(model_cfg.llm.path, model_cfg.llm.gguf_file)
    return Bundle(model, tokenizer, load_image_processor(model_cfg.vision.path), spec)
