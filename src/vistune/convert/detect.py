"""Which checkpoint format a folder holds, read from its files and config fields (never its name).

- `vistune`: `vistune.json` (model/checkpoint.py).
- `llava-hf`: transformers' `LlavaForConditionalGeneration` (config `model_type: llava` with a `text_config`).
- `llava-next`: transformers' `LlavaNextForConditionalGeneration` (`model_type: llava_next`), read as `anyres`.
- `llava`: the original repository's full model (`LlavaLlamaForCausalLM`, ...: an LLM config with
  `mm_vision_tower` and weights).
- `llava-projector`: its stage-1 output, `mm_projector.bin` (projector only) beside the LLM's config.
- `llava-lora`: its LoRA output, `adapter_config.json` + adapter weights + `non_lora_trainables.bin`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vistune.convert.weights import model_weight_files
from vistune.errors import CheckpointError
from vistune.model.checkpoint import SPEC_FILE

Format = Literal["vistune", "llava-hf", "llava-next", "llava", "llava-projector", "llava-lora"]
FORMATS: tuple[Format, ...] = ("vistune", "llava-hf", "llava-next", "llava", "llava-projector", "llava-lora")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Detected:
    format: Format
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)  # config.json, when the format has one


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def detect(folder: str | Path) -> Detected:
    """The format of `folder`, or a CheckpointError saying what was found and what each format needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    if (folder / SPEC_FILE).is_file():
        return Detected("vistune", folder)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config.get("model_type") == "llava" and "text_config" in config:
        return Detected("llava-hf", folder, config)
    if config.get("model_type") == "llava_next" and "text_config" in config:
        return Detected("llava-next", folder, config)
    has_mm = "mm_vision_tower" in config or "mm_projector_type" in config
    if (folder / "adapter_config.json").is_file() and (has_mm or (folder / "non_lora_trainables.bin").is_file()):
        if not any((folder / f).is_file() for f in ADAPTER_FILES):
            raise CheckpointError(f"{folder}: a LLaVA LoRA folder (adapter_config.json) without its adapter weights "
                                  f"({' or '.join(ADAPTER_FILES)})")
        if not has_mm:
            raise CheckpointError(f"{folder}: a LLaVA LoRA folder without the config.json that names its vision tower "
                                  "and projector (mm_vision_tower, mm_projector_type, ...); copy it from the training run")
        return Detected("llava-lora", folder, config)
    if has_mm and model_weight_files(folder):
        return Detected("llava", folder, config)
    if (folder / "mm_projector.bin").is_file():
        return Detected("llava-projector", folder, config)
    if has_mm:
        raise CheckpointError(f"{folder}: config.json has LLaVA fields (mm_vision_tower) but the folder holds no "
                              "weights: expected model*.safetensors, pytorch_model*.bin, mm_projector.bin or a "
                              "LoRA adapter")
    found = sorted(p.name for p in folder.iterdir())[:12]
    raise CheckpointError(
        f"{folder}: {SPEC_FILE} is missing and no other format vistune reads was found (found {found}). "
        f"Expected one of: {SPEC_FILE} (vistune); "
        "config.json with model_type 'llava' and text_config (llava-hf); config.json with mm_vision_tower and "
        "weights (original LLaVA); mm_projector.bin (LLaVA stage 1); adapter_config.json + "
        "non_lora_trainables.bin (LLaVA LoRA)"
    )
