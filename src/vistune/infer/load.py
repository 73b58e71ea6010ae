"""The one way a command takes a model: any folder vistune reads, loaded for inference, and what it is.

`load_model` is what `ask`, `chat`, `serve`, `eval` and `vistune.load` run. It reads
- a vistune checkpoint (`vistune.json`),
- a mid-run resume checkpoint (`OUTPUT_DIR/checkpoints/step-N`, rebuilt from OUTPUT_DIR/config.yaml; see
  `vistune.train.step_model`),
- llava-hf, llava-next and original LLaVA folders, converted in memory by `vistune.convert`
  (what `vistune info` and `vistune convert` read; nothing is written).

`model_identity` says which model a folder holds, so that cached replies (`vistune eval`'s
predictions) are never credited to another model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vistune.errors import CheckpointError
from vistune.model.checkpoint import Bundle
from vistune.model.quiet import quiet_loading

# Files that define a model. Configs are hashed by content; weights by size and modification
# time, which change whenever they are rewritten, without reading gigabytes.
_CONFIG_SUFFIXES = {".json", ".model", ".txt", ".jinja"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt"}
# Not the model: resume checkpoints beside a finished one, training logs.
_SKIP_DIRS = {"checkpoints", "logs", "runs", "tensorboard"}


@dataclass(frozen=True)
class ModelIdentity:
    """A model folder by resolved path and a fingerprint of its config and weight files."""

    path: str
    fingerprint: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.path, "fingerprint": self.fingerprint}


def _model_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]) or rel.name.startswith("."):
            continue
        if path.is_file() and path.suffix in _CONFIG_SUFFIXES | _WEIGHT_SUFFIXES:
            files.append(path)
    return files


def model_identity(folder: str | Path) -> ModelIdentity:
    """Resolved path + a hash of the folder's configs (content) and weights (name, size, mtime).
    A step checkpoint also counts its stage's resolved config (OUTPUT_DIR/config.yaml)."""
    folder = Path(folder).resolve()
    digest = hashlib.sha256()
    from vistune.train.step_model import is_step_checkpoint, stage_file

    extra = [stage_file(folder)] if is_step_checkpoint(folder) and stage_file(folder).is_file() else []
    for path in _model_files(folder) + extra:
        stat = path.stat()
        digest.update(str(path.relative_to(folder) if path.is_relative_to(folder) else f"../{path.name}").encode())
        if path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return ModelIdentity(str(folder), digest.hexdigest()[:16])


def check_model_folder(path: str | Path) -> Path:
    """`path`, or a CheckpointError when it does not exist or is not a folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; give the model's folder")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               vision: Path | None = None, llm: Path | None = None, base: Path | None = None) -> Bundle:
    """Any model folder vistune reads, on `device` in `dtype`, in eval mode. `vision`, `llm`, `base`:
    local copies of parts an original-LLaVA folder only names (as `vistune convert` takes them)."""
    path = check_model_folder(path)
    from vistune.train.step_model import is_step_checkpoint, load_step_checkpoint

    if is_step_checkpoint(path):
        bundle = load_step_checkpoint(path, dtype)
    else:
        from vistune.convert.api import load_any

        with quiet_loading():  # original LLaVA LoRA folders are wrapped with peft by the converter
            bundle, _ = load_any(path, vision=vision, llm=llm, base=base, dtype=dtype)
    bundle.model.to(device=device, dtype=dtype).eval()
    return bundle
