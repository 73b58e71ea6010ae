"""Resume checkpoints: everything needed to continue a stage exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-000040/
      trainable.safetensors   trainable parameters only (a frozen 7B LLM is not rewritten every N steps)
      optimizer.pt            optimizer state (tensors and numbers; read back with weights_only=True)
      scheduler.pt
      rng.pt                  torch (CPU and CUDA) generator states
      progress.json           step, epoch, batches done in the epoch, python RNG, skip counts

accelerate's `save_state` would write the whole model, frozen parts included, hence this small
module. A checkpoint is written into a temporary folder and renamed into place, so a crash while
saving leaves the previous checkpoint intact; a folder without progress.json is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vistune.errors import CheckpointError


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, keep: int) -> Path:
    ckpt_root = folder / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{progress.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root))
    save_file(_trainable(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
    torch.save(rng, tmp / "rng.pt")
    state = asdict(progress)
    state["python_random"] = random.getstate()
    # progress.json last: its presence marks the checkpoint complete.
    (tmp / "progress.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file())


def load_resume(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        raise CheckpointError(f"{ckpt}: its trainable parameters differ from this stage's "
                              f"({len(set(weights) ^ wanted)} names differ); was the stage config changed?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ckpt / "progress.json").read_text())
    py = state.pop("python_random")
    random.setstate((py[0], tuple(py[1]), py[2]))
    return Progress(**state)
