"""What a run was: its resolved config and software versions beside the model, and the fingerprint that
keeps a resumed run from silently continuing under another config or data.

    OUTPUT_DIR/config.yaml     this stage as a runnable config: overrides applied, every default written
                               out, `projector_from: <stage>` resolved to a path (`vistune train` on it
                               trains this stage again)
    OUTPUT_DIR/versions.json   python, torch, transformers, peft, accelerate, vistune, vistune's git revision
    checkpoints/step-N/fingerprint.json   what shapes the run (see `fingerprint`)

As the HF Trainer (training_args.bin) and LLaMA-Factory (training_args.yaml) do, but as readable YAML.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from vistune.config import ModelConfig, StageConfig
from vistune.errors import ConfigError
from vistune.files import write_text
from vistune.train.console import log
from vistune.train.state import FINGERPRINT_FILE, clean_stale_temps, list_checkpoints
from vistune.train.step_model import write_stage_file

VERSIONS_FILE = "versions.json"
# Stage fields that do not change what is trained: how often to log/save/validate, where to report,
# how many loader workers. output_dir is left out so that a checkpoint folder can be moved or copied.
_NOT_SHAPING = {"output_dir", "resume", "stop_after_steps", "save_every", "save_every_minutes", "keep_checkpoints",
                "log_every", "report_to", "val_every", "save_frozen"}
_NOT_SHAPING_DATA = {"num_workers", "verify_images"}


def _git_revision() -> str | None:
    """The commit of the vistune source tree, when it is a git checkout (editable install); '+dirty' if edited."""
    src = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("vistune", "torch", "transformers", "peft", "accelerate", "safetensors", "deepspeed",
                    "flash-attn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    import torch

    found["cuda"] = torch.version.cuda
    found["vistune_git"] = _git_revision()
    return found


def write_run_files(out: Path, model: ModelConfig, stage: StageConfig, name: str) -> None:
    """config.yaml (`write_stage_file`: step-N folders are also rebuilt from it) and versions.json in `out`
    (main process)."""
    write_stage_file(out, model, stage, name)
    write_text(out / VERSIONS_FILE, json.dumps(versions(), indent=2) + "\n")


def data_identity(path: str | Path, ids: list[str]) -> dict[str, Any]:
    """A data file by size and the hash of its sample ids in order. Not by mtime: copying the data to a
    node's local disk changes it, not the content."""
    path = Path(path)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "samples": len(ids), "ids_sha256": digest}


def fingerprint(model: ModelConfig, stage: StageConfig, data: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Everything that shapes the run. `world_size` is recorded but not compared: a checkpoint resumes exactly
    on another number of processes (the global batch and the sample order do not depend on it)."""
    stage_dict = stage.model_dump(mode="json", exclude=_NOT_SHAPING)
    stage_dict["data"] = {k: v for k, v in stage_dict["data"].items() if k not in _NOT_SHAPING_DATA}
    return {"model": model.model_dump(mode="json"), "stage": stage_dict, "data": data, "world_size": world_size}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every compared field that changed. Fields only one side has (a vistune version
    that added or dropped a config field) are not compared."""
    a = _flat({k: v for k, v in old.items() if k != "world_size"})
    b = _flat({k: v for k, v in new.items() if k != "world_size"})
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def check_resume(ckpt: Path, current: dict[str, Any], name: str, allow_changes: bool) -> list[str]:
    """Stop when the checkpoint was written under another config or data, listing what changed; returns the
    differences (empty when none, or when the checkpoint predates fingerprints)."""
    path = ckpt / FINGERPRINT_FILE
    if not path.is_file():
        return []
    changed = differences(json.loads(path.read_text()), current)
    if changed and not allow_changes:
        shown = "\n  ".join(changed[:20]) + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else "")
        raise ConfigError(
            f"[{name}] {ckpt} was written by a run with another config or data:\n  {shown}\n"
            f"To start this stage fresh, delete {ckpt.parent} (or set stages.{name}.resume=false); to continue "
            "from the checkpoint under the new settings anyway, pass --allow-config-change")
    return changed


def resume_checkpoints(out: Path, stage: StageConfig, name: str, run_fingerprint: dict, allow_change: bool,
                       accelerator: Accelerator) -> list[Path]:
    """Resume checkpoints of this stage, after removing temp folders of a killed save and checking that the
    newest was written under the same config and data (before minutes go into loading weights)."""
    if accelerator.is_main_process:
        for tmp in clean_stale_temps(out):
            log(f"[{name}] removed {tmp}, left by a run killed while saving a checkpoint")
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(out) if stage.resume else []
    if checkpoints:
        changed = check_resume(checkpoints[-1], run_fingerprint, name, allow_change)
        if changed:
            log(f"[{name}] resuming under changed settings (--allow-config-change): {'; '.join(changed)}")
    return checkpoints
