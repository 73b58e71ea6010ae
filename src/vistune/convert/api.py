"""Convert, merge and load any supported checkpoint: what `vistune convert`, `merge-lora` and `info` run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vistune.convert.detect import Detected, detect
from vistune.convert.llava_hf import read_llava_hf, write_llava_hf
from vistune.convert.llava_original import read_llava
from vistune.errors import CheckpointError
from vistune.model.checkpoint import Bundle, load_checkpoint, save_checkpoint

Target = Literal["vistune", "llava-hf", "llava-next"]


def load_any(src: str | Path, vision: Path | None = None, llm: Path | None = None, base: Path | None = None,
             merge: bool = True, fmt: str | None = None, system_prompt: str | None = None,
             dtype: torch.dtype | None = None) -> tuple[Bundle, Detected]:
    """Any supported folder as a Bundle, with what was detected. `vision`, `llm`, `base`: local folders
    of parts an original-LLaVA folder only names; `fmt`/`system_prompt`: conversation format for
    sources that do not record one."""
    det = detect(src)
    if det.format == "vistune":
        return load_checkpoint(det.folder, dtype=dtype or torch.float32), det
    if det.format in ("llava-hf", "llava-next"):
        return read_llava_hf(det.folder, fmt, system_prompt, dtype), det
    return read_llava(det, vision, llm, base, merge, fmt or "vicuna_v1", system_prompt), det


def _merged(bundle: Bundle) -> Bundle:
    if hasattr(bundle.model.llm, "peft_config"):
        bundle.model.llm = bundle.model.llm.merge_and_unload()
        bundle.spec = bundle.spec.model_copy(update={"llm_adapter": None})
    return bundle


def write_vistune(bundle: Bundle, dst: Path, provenance: dict[str, object]) -> Path:
    """The bundle as a self-contained vistune checkpoint (every part copied in)."""
    llm_mode = "lora" if hasattr(bundle.model.llm, "peft_config") else "full"
    bundle.spec = bundle.spec.model_copy(update={"provenance": {**bundle.spec.provenance, **provenance}})
    return save_checkpoint(dst, bundle, bundle.spec.vision, bundle.spec.llm, llm_mode, save_frozen=True)


def _check_dst(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} exists and is not empty; give a new folder")


def convert(src: str | Path, dst: str | Path, to: Target, vision: Path | None = None, llm: Path | None = None,
            base: Path | None = None, merge: bool = True, fmt: str | None = None, system_prompt: str | None = None,
            dtype: torch.dtype | None = None) -> tuple[Path, Detected]:
    """Convert `src` (format detected) to `to` in `dst`. LoRA is merged unless `merge=False` (vistune only)."""
    dst = Path(dst)
    _check_dst(dst)
    if to in ("llava-hf", "llava-next") and not merge:
        raise CheckpointError(f"{to} has no place for a separate adapter; convert with merging")
    bundle, det = load_any(src, vision, llm, base, merge, fmt, system_prompt, dtype)
    if det.format == "vistune" and to == "vistune" and not bundle.spec.llm_adapter:
        raise CheckpointError(f"{src} is already a vistune checkpoint without an adapter; nothing to convert")
    if merge:
        bundle = _merged(bundle)
    if to in ("llava-hf", "llava-next"):
        mode = bundle.model.layout.mode
        if (to == "llava-next") != (mode == "anyres"):
            raise CheckpointError(f"{src} has image_mode {mode!r}: llava-next holds `anyres` models only, llava-hf "
                                  "`single` ones; choose the other --to (`hd` models stay in the vistune format)")
        return write_llava_hf(bundle, dst), det
    if to != "vistune":
        raise CheckpointError(f"unknown target format {to!r}; valid: vistune, llava-hf, llava-next")
    return write_vistune(bundle, dst, {"converted_from": str(Path(src).resolve()), "source_format": det.format}), det


def merge_lora(src: str | Path, dst: str | Path, base: Path | None = None, vision: Path | None = None) -> Path:
    """A LoRA finetune (vistune, or original LLaVA with its `base`) with the adapter merged into the LLM,
    written as a vistune checkpoint."""
    dst = Path(dst)
    _check_dst(dst)
    det = detect(src)
    if det.format == "vistune":
        bundle = load_checkpoint(det.folder)
        if not bundle.spec.llm_adapter:
            raise CheckpointError(f"{src}: this checkpoint has no LoRA adapter (llm_adapter is empty); nothing to merge")
    elif det.format == "llava-lora":
        bundle, _ = load_any(src, vision=vision, base=base, merge=True)
    else:
        raise CheckpointError(f"{src}: a {det.format} folder has no LoRA adapter to merge")
    return write_vistune(_merged(bundle), dst, {"merged_from": str(Path(src).resolve()), "source_format": det.format})
