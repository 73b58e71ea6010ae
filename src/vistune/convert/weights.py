"""Reading raw weight files: safetensors, or pickled `.bin` through `torch.load(weights_only=True)`.

The original LLaVA code saves `mm_projector.bin`, `non_lora_trainables.bin` and often
`pytorch_model-*.bin` shards. Unrestricted unpickling runs arbitrary code, so `.bin` files are only
ever read with `weights_only=True`, which accepts tensors and plain containers and nothing else.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from vistune.errors import CheckpointError


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One `.safetensors` or `.bin` file -> {name: tensor} on the CPU."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors ({e}); vistune reads .bin "
                              "files only with torch.load(weights_only=True)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def model_weight_files(folder: Path) -> list[Path]:
    """The model weight files of a HF-style folder: safetensors shards if any, else `.bin` shards."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard(s) {missing} are missing from {folder}")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    return []


def load_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = model_weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no model weights (model.safetensors[.index.json] or "
                              "pytorch_model[-*].bin[.index.json])")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weight_file(f))
    return state
