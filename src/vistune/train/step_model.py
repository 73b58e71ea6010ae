"""A mid-run resume checkpoint (`OUTPUT_DIR/checkpoints/step-N`) as a model to ask or evaluate.

A step folder holds only the trainable weights (see `vistune.train.state`), not a description of
the model. Training therefore writes the stage's model and stage config once beside the step
folders, `OUTPUT_DIR/checkpoints/stage.json`; the model is rebuilt from it exactly as the stage
built it (parts, projector_from, LoRA wrapping) and the step's weights are put in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from vistune.config import ModelConfig, StageConfig
from vistune.errors import CheckpointError
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, load_projector
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.train.parts import apply_parts

STAGE_FILE = "stage.json"
_WEIGHTS = "trainable.safetensors"
_PROGRESS = "progress.json"


def stage_file(step_folder: Path) -> Path:
    """Where a step folder's stage description lives: beside it, in `checkpoints/`."""
    return step_folder.parent / STAGE_FILE


def write_stage_file(output_dir: Path, model_cfg: ModelConfig, stage: StageConfig, name: str) -> None:
    """Record how the stage builds its model, beside its resume checkpoints (main process)."""
    path = output_dir / "checkpoints" / STAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STAGE_FILE}.tmp")
    # Absolute paths: the checkpoint may be asked from another working directory.
    model = model_cfg.model_dump(mode="json")
    for part in ("vision", "llm"):
        model[part]["path"] = str(Path(model[part]["path"]).resolve())
    settings = stage.model_dump(mode="json")
    if settings.get("projector_from") and Path(settings["projector_from"]).exists():
        settings["projector_from"] = str(Path(settings["projector_from"]).resolve())
    tmp.write_text(json.dumps({"name": name, "model": model, "stage": settings}, indent=1))
    os.replace(tmp, path)


def is_step_checkpoint(folder: Path) -> bool:
    return (folder / _WEIGHTS).is_file() and (folder / _PROGRESS).is_file()


def _read_stage(folder: Path) -> tuple[str, ModelConfig, StageConfig]:
    path = stage_file(folder)
    if not path.is_file():
        raise CheckpointError(f"{folder} is a resume checkpoint, but {path} (how its stage builds the model) is "
                              "missing; it was written by an older vistune. Resume the run and let it finish, or "
                              "ask the finished output folder")
    try:
        data = json.loads(path.read_text())
        return data["name"], ModelConfig.model_validate(data["model"]), StageConfig.model_validate(data["stage"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable stage description ({e})") from None


def load_step_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """The model of a resume checkpoint, built as its stage built it, with the step's weights (CPU)."""
    name, model_cfg, stage = _read_stage(folder)
    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, dtype, dtype)
    if stage.projector_from:  # a frozen projector is not in the step's trainable weights
        load_projector(model, stage.projector_from, model_cfg.projector)
    apply_parts(model, stage.parts, stage.lora, gradient_checkpointing=False)
    weights = load_file(str(folder / _WEIGHTS))
    unknown = sorted(set(weights) - set(model.state_dict()))
    if unknown:
        raise CheckpointError(f"{folder}: {len(unknown)} weights do not fit the model {stage_file(folder)} describes "
                              f"(first: {unknown[0]}); was the stage config changed after this step was saved?")
    model.load_state_dict(weights, strict=False)  # the frozen rest came from the parts' sources
    model.requires_grad_(False)
    progress = json.loads((folder / _PROGRESS).read_text())
    spec = ModelSpec(vision=model_cfg.vision, llm=model_cfg.llm, projector=model_cfg.projector,
                     vision_hidden_size=model.vision.hidden_size,
                     llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
                     num_image_tokens=model.num_image_tokens, conversation_format=stage.format,
                     system_prompt=stage.system_prompt, model_max_length=stage.model_max_length,
                     provenance={"stage": name, "steps": progress.get("step"), "resume_checkpoint": str(folder)})
    tokenizer = load_tokenizer(model_cfg.llm.path, model_cfg.llm.gguf_file)
    return Bundle(model, tokenizer, load_image_processor(model_cfg.vision.path), spec)
