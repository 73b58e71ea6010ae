"""Resume checkpoints: everything needed to continue a stage exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-000040/
      trainable.safetensors   trainable parameters only (a frozen 7B LLM is not rewritten every N steps)
      optimizer.pt            optimizer state (tensors and numbers; read back with weights_only=True)
      scheduler.pt
      rng.pt                  torch (CPU and CUDA) generator states
      progress.json           step, epoch, batches done in the epoch, python RNG, skip counts
      engine/                 under DeepSpeed instead of the first two files: its own state (engine_state.py)

accelerate's `save_state` would write the whole model, frozen parts included, hence this small
module. Weights and optimizer state are saved unsharded and keyed by parameter name (torch's
`torch.distributed.checkpoint.state_dict` API, which also gathers FSDP shards), so a checkpoint written by
N processes resumes on M. A checkpoint is written into a temporary folder and renamed into place, so a crash while
saving leaves the previous checkpoint intact; a folder without progress.json is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from vistune.errors import CheckpointError
from vistune.files import replacing_folder


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_seen: list[list[str]] = field(default_factory=list)  # [reason, message] of each record counted


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# The files of a resume checkpoint that other modules read (step_model.py, provenance.py).
WEIGHTS_FILE = "trainable.safetensors"
PROGRESS_FILE = "progress.json"  # written last: its presence marks the checkpoint complete
FINGERPRINT_FILE = "fingerprint.json"  # the run's config and data identity (provenance.py)
ENGINE_DIR = "engine"  # DeepSpeed's own partitioned state (engine_state.py), in place of the two files above


def _trainable_names(model: nn.Module) -> set[str]:
    """Trainable parameter names as the state-dict API spells them (no DDP/FSDP/compile wrapper prefixes)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n.replace("_orig_mod.", "").removeprefix("module.") for n in names}


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Unsharded trainable weights and optimizer state, on CPU. Every process must call this (FSDP gathers)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        wanted = _trainable_names(model)
        weights = {n: t.contiguous() for n, t in get_model_state_dict(model, options=_FULL).items() if n in wanted}
    elif dist.is_initialized() and dist.get_rank() != 0:
        weights = {}  # only the main process writes: no host copy of the weights on the others
    else:  # no gathering needed, and no copy of a frozen 7B LLM every save
        weights = {n.replace("_orig_mod.", "").removeprefix("module."): p.detach().contiguous().cpu()
                   for n, p in model.named_parameters() if p.requires_grad}
    return weights, get_optimizer_state_dict(model, optimizer, options=_FULL)


def save_resume(folder: Path, state: tuple[dict[str, torch.Tensor], dict] | None,
                scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, keep: int,
                engine_dir: Path | None = None, fingerprint: dict | None = None) -> Path:
    """Write a checkpoint from `gather_state`'s result (main process only), with the run's fingerprint
    (provenance.py) beside it. Under DeepSpeed `state` is None and `engine_dir` holds the engine's own state
    (engine_state.py), which is moved in as `ENGINE_DIR`."""
    ckpt_root = folder / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{progress.step:06d}"
    with replacing_folder(final, prefix=".tmp-") as tmp:  # the prefix clean_stale_temps looks for
        if state is not None:
            weights, optim_state = state
            save_file(weights, str(tmp / WEIGHTS_FILE))
            torch.save(optim_state, tmp / "optimizer.pt")
        if engine_dir is not None:
            os.replace(engine_dir, tmp / ENGINE_DIR)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
        torch.save(rng, tmp / "rng.pt")
        if fingerprint is not None:
            (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        state = asdict(progress)
        state["python_random"] = random.getstate()
        # progress.json last: its presence marks the checkpoint complete.
        (tmp / PROGRESS_FILE).write_text(json.dumps(state))
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove `checkpoints/.tmp-*` (and DeepSpeed's `.engine-step-*` staging) left by a process killed while
    saving (resume never reads them; they can hold a full copy of weights and optimizer state). Main process,
    before this run saves anything."""
    root = folder / "checkpoints"
    stale = sorted([*root.glob(".tmp-*"), *root.glob(".engine-step-*")]) if root.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    return stale


def list_checkpoints(folder: Path) -> list[Path]:
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / PROGRESS_FILE).is_file())


def load_resume(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """Load a checkpoint into the (possibly DDP/FSDP-wrapped) model and its optimizer, on every process.

    With several processes only the first reads the weights and optimizer state and broadcasts them, one
    tensor at a time (torch's `broadcast_from_rank0`); FSDP shards them on the way in. A 7B full finetune's
    are ~27 GB of fp32 weights and ~54 GB of Adam moments: read on each of 8 ranks, more host memory than
    many 8-GPU nodes have. The small files (scheduler, RNG, progress) are read everywhere."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    reader = not several or dist.get_rank() == 0
    weights: dict[str, torch.Tensor] = {}
    optim_state: dict = {}
    problem = None
    if reader:
        weights = load_file(str(ckpt / WEIGHTS_FILE))
        wanted = _trainable_names(model)
        if set(weights) != wanted:
            problem = (f"{ckpt}: its trainable parameters differ from this stage's "
                       f"({len(set(weights) ^ wanted)} names differ); was the stage config changed?")
        else:  # mmap: pages are read as the broadcast walks the tensors, not all up front
            optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True, mmap=True)
    if several:  # every process must raise, or the others would wait for a broadcast that never comes
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise CheckpointError(problem)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    # Unsharded models on one process take the full dicts as they are; otherwise rank 0's are
    # broadcast (and, under FSDP, sharded).
    options = StateDictOptions(full_state_dict=sharded or several, broadcast_from_rank0=several, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    del weights, optim_state
    return read_progress(ckpt, scheduler)


def read_progress(ckpt: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """The scheduler, RNG states and progress of a checkpoint (every process reads these small files)."""
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ckpt / PROGRESS_FILE).read_text())
    py = state.pop("python_random")
    random.setstate((py[0], tuple(py[1]), py[2]))
    return Progress(**state)
