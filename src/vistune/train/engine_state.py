"""Resume checkpoints under DeepSpeed ZeRO: the engine's own state, through accelerate's save_state/load_state.

DeepSpeed keeps the optimizer state (and, under ZeRO-3, the weights) in its own partitioned objects, which
torch's name-keyed state-dict API (state.py) cannot read. So under `distributed: zero2/zero3` a resume
checkpoint holds DeepSpeed's checkpoint in `engine/` (written by every process: each saves its partition)
instead of trainable.safetensors + optimizer.pt; scheduler, RNG and progress files are the same as ever.
Frozen parameters are left out (`exclude_frozen_parameters`), as state.py leaves out a frozen 7B LLM.

What cannot work is refused before anything loads, with the reason (`check_resumable`):
- a DeepSpeed checkpoint resumed under ddp/fsdp, or the reverse: the two hold different things;
- a DeepSpeed checkpoint resumed on another process count: ZeRO's optimizer partitions are cut for the
  process count that wrote them (DeepSpeed's ds_to_universal.py converts them, outside vistune).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from vistune.errors import CheckpointError
from vistune.train.state import ENGINE_DIR, Progress, read_progress, save_resume

_ABOUT = "vistune.json"  # in engine/: the engine and process count that wrote it


def save_engine_resume(accelerator: Accelerator, folder: Path, engine: str,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, keep: int,
                       fingerprint: dict | None = None) -> Path:
    """Write a resume checkpoint under DeepSpeed. Every process must call this (each writes its partition)."""
    staging = folder / "checkpoints" / f".engine-step-{progress.step:06d}"  # one name on every process
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save of this step
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    final = folder / "checkpoints" / f"step-{progress.step:06d}"
    if accelerator.is_main_process:
        (staging / _ABOUT).write_text(json.dumps({"engine": engine, "processes": accelerator.num_processes}))
        final = save_resume(folder, None, scheduler, progress, keep, engine_dir=staging, fingerprint=fingerprint)
    accelerator.wait_for_everyone()
    return final


def load_engine_resume(accelerator: Accelerator, ckpt: Path,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """Load a checkpoint written by `save_engine_resume` into the prepared DeepSpeed engine (every process)."""
    # Frozen parameters were not saved: they come from the model as built, hence not strict.
    accelerator.load_state(str(ckpt / ENGINE_DIR), load_module_strict=False)
    return read_progress(ckpt, scheduler)


def check_resumable(ckpt: Path, engine: str, deepspeed: bool, processes: int) -> None:
    """Refuse, naming the reason, a checkpoint this run cannot continue from (see the module docstring)."""
    about = ckpt / ENGINE_DIR / _ABOUT
    if not about.is_file():
        if deepspeed:
            raise CheckpointError(
                f"{ckpt} was written under ddp/fsdp (weights and optimizer state keyed by name); DeepSpeed cannot "
                f"load such optimizer state into its partitions. Resume it with distributed: ddp or fsdp, or "
                f"start {engine} in a new output_dir")
        return
    written = json.loads(about.read_text())
    if not deepspeed:
        raise CheckpointError(
            f"{ckpt} was written under DeepSpeed ({written['engine']}, its own partitioned state); resume it with "
            f"distributed: {written['engine']} on {written['processes']} processes, or start {engine} in a new "
            "output_dir")
    if written["processes"] != processes:
        raise CheckpointError(
            f"{ckpt} was written by {written['processes']} DeepSpeed processes and this launch has {processes}: "
            f"ZeRO's optimizer state is partitioned per process and reads back only on as many. Launch "
            f"{written['processes']} processes (or convert it with DeepSpeed's ds_to_universal.py)")
