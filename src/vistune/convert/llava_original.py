"""Readers for the original LLaVA repository's outputs (haotian-liu/LLaVA), into a vistune Bundle.

Its folders are an LLM folder whose config.json carries the multimodal fields (`mm_vision_tower`,
`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_use_im_start_end`,
`image_aspect_ratio`, ...) and whose weights add `model.mm_projector.{0,2}.*` (and, when the tower
was saved or tuned, `model.vision_tower.vision_tower.<CLIP keys>`) to the LLM's own keys:
- full model: `LlavaLlamaForCausalLM` weights (safetensors or `pytorch_model*.bin`);
- stage 1: `mm_projector.bin` only; the LLM and vision tower are named in config.json;
- LoRA: a peft adapter on the LLM + `non_lora_trainables.bin` (keys prefixed `base_model.model.`) holding
  the projector; the base LLM is not in the folder.
LLaVA-NeXT folders (`image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`) become `anyres`
models: their `image_grid_pinpoints` are (width, height) pairs, turned into vistune's (height, width)
in the same order (so ties between pinpoints resolve as in LLaVA), and `model.image_newline` joins
the projector's weights.
The vision tower is named by hub id (`openai/clip-vit-large-patch14-336`); vistune never downloads,
so a local copy is given with `vision=` unless the config already names a local folder. The
conversation format is not stored by LLaVA (it picks one from the model's name): the default here
is LLaVA-1.5's `vicuna_v1`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from vistune.config import LLMConfig, VisionConfig
from vistune.convert.assemble import assemble, causal_lm_from_state
from vistune.convert.detect import ADAPTER_FILES, Detected, read_json
from vistune.convert.weights import load_model_weights, load_weight_file
from vistune.errors import CheckpointError
from vistune.model.checkpoint import Bundle
from vistune.model.llm import load_llm, load_tokenizer
from vistune.registry_keys import check_projector_key
from vistune.model.vision import load_image_processor, load_vision_encoder

PROJECTOR_PREFIX = "model.mm_projector."
NEWLINE = "model.image_newline"  # LLaVA-NeXT's row-end embedding
VISION_PREFIX = "model.vision_tower.vision_tower."
LORA_PREFIX = "base_model.model."
# The LLM architectures LLaVA wraps: its model_type -> the plain transformers model_type.
BASE_MODEL_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral", "llava_mpt": "mpt",
                    "llava_qwen": "qwen2"}
# config.json fields that belong to LLaVA's wrapper, not to the LLM.
_LLAVA_FIELDS = {"image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                 "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "unfreeze_mm_vision_tower",
                 "architectures", "model_type", "_name_or_path"}


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def _vision_settings(config: dict[str, Any], folder: Path, vision: Path | None) -> tuple[Path, VisionConfig]:
    if config.get("mm_use_im_start_end"):
        raise CheckpointError(f"{folder}: mm_use_im_start_end is true (image wrapped in <im_start>/<im_end> tokens, "
                              "LLaVA v0); vistune's models do not use those tokens, so it cannot be converted")
    aspect = config.get("image_aspect_ratio") or "square"
    anyres: dict[str, Any] = {}
    if aspect == "anyres":
        merge = config.get("mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise CheckpointError(f"{folder}: anyres with mm_patch_merge_type {merge!r}; vistune's anyres is "
                                  "LLaVA-NeXT's 'spatial_unpad' (unpadded map with row-end embeddings)")
        points = config.get("image_grid_pinpoints")
        points = ast.literal_eval(points) if isinstance(points, str) else points
        if not isinstance(points, list) or not points:
            raise CheckpointError(f"{folder}: image_aspect_ratio anyres without image_grid_pinpoints")
        # LLaVA lists (width, height); vistune (like transformers) (height, width).
        anyres = {"image_mode": "anyres", "image_grid_pinpoints": [(int(h), int(w)) for w, h in points]}
    elif aspect not in ("pad", "square"):
        raise CheckpointError(f"{folder}: image_aspect_ratio {aspect!r} is not supported; vistune handles 'pad', "
                              "'square' and LLaVA-NeXT's 'anyres'")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{folder}: mm_vision_select_feature {feature!r} is not 'patch' or 'cls_patch'")
    named = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    if vision is None:
        if not named or not Path(named).is_dir():
            raise CheckpointError(f"{folder}: needs its vision tower: config.json names mm_vision_tower {named!r}, "
                                  "which is not a local folder; pass --vision with a local copy of it")
        vision = Path(named)
    settings = VisionConfig(path=str(vision), select_layer=int(config.get("mm_vision_select_layer", -1)),
                            select_feature=feature, image_preprocess="pad" if aspect == "pad" else "processor",
                            **anyres)
    return vision, settings


def _llm_config(config: dict[str, Any], folder: Path) -> Any:
    model_type = config.get("model_type", "")
    base = BASE_MODEL_TYPES.get(model_type)
    if base is None:
        raise CheckpointError(f"{folder}: model_type {model_type!r} is not one of LLaVA's "
                              f"({', '.join(sorted(BASE_MODEL_TYPES))})")
    fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in _LLAVA_FIELDS}
    return AutoConfig.for_model(base, **fields)


def _split(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(keys under `prefix` with it stripped, the rest)."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in state.items() if not k.startswith(prefix)}


def _load_tower(vision_path: Path, vision_state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path) -> Any:
    encoder = load_vision_encoder(vision_path, dtype)
    if vision_state:  # the checkpoint saved (or tuned) the tower: its weights win over the named folder's
        missing, unexpected = encoder.load_state_dict(vision_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{where}: the saved vision tower weights do not fit {vision_path} "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return encoder


def _take_newline(state: dict[str, torch.Tensor], projector_state: dict[str, torch.Tensor]) -> None:
    """Move LLaVA-NeXT's `model.image_newline` (if any) from `state` to the projector's weights."""
    if NEWLINE in state:
        projector_state["image_newline"] = state.pop(NEWLINE)


def _finish(det: Detected, encoder: Any, vision: VisionConfig, projector_state: dict[str, torch.Tensor], llm: Any,
            llm_cfg: LLMConfig, tokenizer_dir: Path, fmt: str, system_prompt: str | None) -> Bundle:
    config = det.config
    key = check_projector_key(config.get("mm_projector_type", "linear"))
    max_len = int(config.get("tokenizer_model_max_length") or config.get("max_position_embeddings") or 2048)
    return assemble(encoder, vision, key, projector_state, llm, llm_cfg, load_tokenizer(tokenizer_dir),
                    load_image_processor(vision.path), fmt, system_prompt, max_len,
                    {"converted_from": str(det.folder.resolve()), "source_format": det.format}, det.folder)


def read_llava(det: Detected, vision: Path | None = None, llm: Path | None = None, base: Path | None = None,
               merge: bool = True, fmt: str = "vicuna_v1", system_prompt: str | None = None) -> Bundle:
    """An original-LLaVA folder (full, stage-1 projector, or LoRA) as a vistune Bundle."""
    folder, config = det.folder, det.config
    vision_path, vision_cfg = _vision_settings(config, folder, vision)
    dtype = _config_dtype(config)
    if det.format == "llava":
        state = load_model_weights(folder)
        projector_state, state = _split(state, PROJECTOR_PREFIX)
        vision_state, state = _split(state, VISION_PREFIX)
        _take_newline(state, projector_state)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        model = causal_lm_from_state(_llm_config(config, folder), state, str(folder), dtype)
        encoder = _load_tower(vision_path, vision_state, dtype, folder)
        return _finish(det, encoder, vision_cfg, projector_state, model, LLMConfig(path=str(folder)), folder, fmt,
                       system_prompt)

    if det.format == "llava-projector":
        if llm is None:
            named = config.get("_name_or_path", "")
            if not named or not Path(named).is_dir():
                raise CheckpointError(f"{folder}: a stage-1 projector (mm_projector.bin) needs its LLM: config.json "
                                      f"names {named!r}; pass --llm with a local copy of it")
            llm = Path(named)
        projector_state, rest = _split(load_weight_file(folder / "mm_projector.bin"), PROJECTOR_PREFIX)
        _take_newline(rest, projector_state)
        model = load_llm(llm, dtype=dtype)
        encoder = _load_tower(vision_path, {}, dtype, folder)
        return _finish(det, encoder, vision_cfg, projector_state, model, LLMConfig(path=str(llm)), llm, fmt,
                       system_prompt)

    if det.format != "llava-lora":
        raise CheckpointError(f"{folder}: {det.format} is not an original-LLaVA format")
    return _read_lora(det, vision_path, vision_cfg, base, merge, fmt, system_prompt, dtype)


def _read_lora(det: Detected, vision_path: Path, vision_cfg: VisionConfig, base: Path | None, merge: bool, fmt: str,
               system_prompt: str | None, dtype: torch.dtype) -> Bundle:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    folder = det.folder
    adapter_config = read_json(folder / "adapter_config.json")
    if base is None:
        named = str(adapter_config.get("base_model_name_or_path") or det.config.get("_name_or_path") or "")
        if not named or not Path(named).is_dir():
            raise CheckpointError(f"{folder}: a LoRA output needs its base LLM: adapter_config.json names "
                                  f"{named!r}; pass --base with a local copy of it")
        base = Path(named)
    model = load_llm(base, dtype=dtype)
    non_lora = folder / "non_lora_trainables.bin"
    extra = load_weight_file(non_lora) if non_lora.is_file() else {}
    extra = {k.removeprefix(LORA_PREFIX): v for k, v in extra.items()}
    projector_state, extra = _split(extra, PROJECTOR_PREFIX)
    _take_newline(extra, projector_state)
    vision_state, llm_extra = _split(extra, VISION_PREFIX)
    if not projector_state:
        raise CheckpointError(f"{folder}: no projector weights ({PROJECTOR_PREFIX}*) in non_lora_trainables.bin")
    if llm_extra:  # e.g. embeddings trained outside LoRA
        if not merge:
            raise CheckpointError(f"{folder}: non_lora_trainables.bin also changes LLM weights {sorted(llm_extra)[:3]}, "
                                  "which an adapter on the untouched base cannot carry; convert with merging")
        _, unexpected = model.load_state_dict(llm_extra, strict=False)  # missing: the LLM keeps the rest
        if unexpected:
            raise CheckpointError(f"{non_lora}: keys {unexpected[:5]} are not in the LLM")
    adapter_file = next(folder / f for f in ADAPTER_FILES if (folder / f).is_file())
    adapter_state = load_weight_file(adapter_file)
    lora = LoraConfig.from_pretrained(str(folder))
    lora.inference_mode = True
    lora.base_model_name_or_path = str(base)  # the local copy it is applied to
    model = get_peft_model(model, lora)
    result = set_peft_model_state_dict(model, adapter_state)
    loaded_lora = [k for k in model.state_dict() if "lora_" in k]
    if result.unexpected_keys or len(adapter_state) != len(loaded_lora):
        raise CheckpointError(f"{adapter_file}: the adapter does not fit {base} ({len(adapter_state)} tensors for "
                              f"{len(loaded_lora)} LoRA weights; unexpected {list(result.unexpected_keys)[:5]})")
    if merge:
        model = model.merge_and_unload()
    tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    encoder = _load_tower(vision_path, vision_state, dtype, folder)
    return _finish(det, encoder, vision_cfg, projector_state, model, LLMConfig(path=str(base)), tokenizer_dir, fmt,
                   system_prompt)
