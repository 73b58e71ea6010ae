"""The one checkpoint format: a self-describing folder, and the one way to build a model.

    CKPT/
      vistune.json          every model and format field (ModelSpec); paths relative to CKPT or absolute
      projector.safetensors
      tokenizer/            the tokenizer (always saved: it defines the ids the model was trained on)
      image_processor/      the vision tower's processor
      vision/               the vision tower, when copied (save_frozen) ...
      llm/                  the LLM: trained weights, or a copy of a frozen source
      llm_adapter/          a peft LoRA adapter on top of `llm`, when the LLM trained with LoRA

Frozen parts are copied from their source files (they are byte-identical to it), or, with
`save_frozen: false`, recorded by absolute path like LLaVA's projector-only stage-1 output. No
pickle: weights are safetensors (or the source's GGUF).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from transformers import BaseImageProcessor, PreTrainedTokenizerBase

from vistune.config import LLMConfig, VisionConfig
from vistune.errors import CheckpointError
from vistune.model.llm import load_llm, load_tokenizer
from vistune.model.projector import build_projector
from vistune.model.quiet import quiet_loading
from vistune.model.tiling import ImageLayout
from vistune.model.vision import VisionTower, load_image_processor, load_vision_encoder
from vistune.model.vlm import VisionLanguageModel
from vistune.strict import Strict

SPEC_FILE = "vistune.json"
PROJECTOR_FILE = "projector.safetensors"
# Files worth copying from a frozen LLM's source folder: configs, tokenizers, safetensors and GGUF weights.
# Pickled weights (*.bin, *.pt) are never copied.
_COPY_SUFFIXES = {".json", ".txt", ".model", ".safetensors", ".gguf", ".jinja", ".tiktoken", ".py"}


class ModelSpec(Strict):
    """Everything needed to rebuild a model, as stored in `vistune.json`."""

    format_version: Literal[1] = 1
    vision: VisionConfig
    llm: LLMConfig
    llm_adapter: str | None = Field(None, description="peft adapter folder on top of `llm`.")
    projector: str
    vision_hidden_size: int
    llm_hidden_size: int
    num_image_tokens: int
    conversation_format: str
    system_prompt: str | None = None
    model_max_length: int
    tokenizer: str = "tokenizer"
    image_processor: str = "image_processor"
    provenance: dict[str, object] = Field(default_factory=dict, description="How it was made (for people).")


@dataclass
class Bundle:
    """A model with what it needs to run: tokenizer, image processor and its spec."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: BaseImageProcessor
    spec: ModelSpec


def compose(encoder: torch.nn.Module, vision: VisionConfig, lm: torch.nn.Module, projector: str) -> VisionLanguageModel:
    """A model from loaded parts: `encoder` read as `vision` says, a freshly initialised `projector` (float32)
    between it and `lm`, and the image layout the encoder and `vision` give. Every model is composed here:
    `build_model` from source folders, `vistune.convert.assemble` from another format's weights."""
    tower = VisionTower(encoder, vision.select_layer, vision.select_feature)
    proj = build_projector(projector, tower.hidden_size, lm.get_input_embeddings().embedding_dim)
    return VisionLanguageModel(tower, proj, lm, ImageLayout.for_model(vision, tower))


def build_model(vision: VisionConfig, llm: LLMConfig, projector: str, vision_dtype: torch.dtype = torch.float32,
                llm_dtype: torch.dtype = torch.float32) -> VisionLanguageModel:
    """A model from its parts' source folders; the projector is freshly initialised."""
    return compose(load_vision_encoder(vision.path, vision_dtype), vision,
                   load_llm(llm.path, llm.gguf_file, llm_dtype, llm.attn_implementation), projector)


def load_projector(model: VisionLanguageModel, folder: str | Path, expected_key: str) -> None:
    """Load `projector.safetensors` from a vistune checkpoint folder, checking it fits."""
    folder = Path(folder)
    spec = read_spec(folder)
    if spec.projector != expected_key:
        raise CheckpointError(f"{folder}: its projector is {spec.projector!r} but this run builds {expected_key!r}")
    model.load_connector_state(load_file(str(folder / PROJECTOR_FILE)), str(folder / PROJECTOR_FILE),
                               need_newline=False)


def read_spec(folder: str | Path) -> ModelSpec:
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vistune checkpoint: {SPEC_FILE} is missing")
    try:
        return ModelSpec.model_validate_json(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


def _resolve(folder: Path, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() else folder / p)


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Bundle:
    """Load a vistune checkpoint folder, ready for inference (eval mode)."""
    folder = Path(folder)
    spec = read_spec(folder)
    vision = spec.vision.model_copy(update={"path": _resolve(folder, spec.vision.path)})
    llm = spec.llm.model_copy(update={"path": _resolve(folder, spec.llm.path)})
    for name, p in (("vision", vision.path), ("llm", llm.path)):
        if not Path(p).exists():
            raise CheckpointError(f"{folder}: the {name} part is recorded at {p}, which does not exist "
                                  "(the checkpoint was saved with save_frozen: false)")
    model = build_model(vision, llm, spec.projector, dtype, dtype)
    if model.num_image_tokens != spec.num_image_tokens:
        raise CheckpointError(f"{folder}: vision tower gives {model.num_image_tokens} tokens, spec says "
                              f"{spec.num_image_tokens}")
    model.load_connector_state(load_file(str(folder / PROJECTOR_FILE)), str(folder / PROJECTOR_FILE))
    if spec.llm_adapter:
        from peft import PeftModel

        with quiet_loading():  # peft's version-mismatch FutureWarning (see model/quiet.py)
            model.llm = PeftModel.from_pretrained(model.llm, _resolve(folder, spec.llm_adapter))
    tokenizer = load_tokenizer(folder / spec.tokenizer)
    processor = load_image_processor(folder / spec.image_processor)
    model.to(device=device, dtype=dtype).eval()
    return Bundle(model, tokenizer, processor, spec)


def _copy_source(src: str, gguf_file: str | None, dst: Path) -> None:
    """Copy a frozen LLM's source files: exact, and cheap next to re-serialising a (possibly LoRA-wrapped) model."""
    src_path = Path(src)
    dst.mkdir(parents=True)
    names = [gguf_file] if gguf_file else [p.name for p in src_path.iterdir() if p.suffix in _COPY_SUFFIXES]
    if not gguf_file and not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"{src}: frozen part has no safetensors weights to copy (pickled .bin is not copied); "
                              "convert it to safetensors, or set save_frozen: false")
    for name in names:
        shutil.copy2(src_path / name, dst / name)


def _save_trained_llm(llm: torch.nn.Module, folder: Path) -> None:
    """`save_pretrained`, also for an LLM read from a GGUF file. transformers leaves a GGUF quantizer
    attached to such a model and refuses to save it ("quantized with gguf and is not serializable"),
    although its weights were dequantized into ordinary float tensors at load and have been trained
    as such. Saved without the quantizer, they are a plain safetensors model (no GGUF
    `quantization_config` in config.json), which is what `llm/` is expected to hold."""
    quantizer = getattr(llm, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        llm.save_pretrained(str(folder))
        return
    if not all(p.is_floating_point() for p in llm.parameters()):
        raise CheckpointError("the LLM keeps (some) weights packed in GGUF blocks, which cannot be trained or "
                              "saved; train it with `llm: lora` or `frozen`, or convert the GGUF to safetensors")
    config_quant = getattr(llm.config, "quantization_config", None)
    if config_quant is not None:
        delattr(llm.config, "quantization_config")
    llm.hf_quantizer = None
    try:
        llm.save_pretrained(str(folder))
    finally:
        llm.hf_quantizer = quantizer
        if config_quant is not None:
            llm.config.quantization_config = config_quant


def save_checkpoint(out: str | Path, bundle: Bundle, source_vision: VisionConfig, source_llm: LLMConfig,
                    llm_mode: Literal["frozen", "full", "lora"], save_frozen: bool,
                    copy_lora_base: bool = True) -> Path:
    """Write the checkpoint into `out` so that a crash midway never leaves a folder that looks complete.
    `copy_lora_base=False`: a LoRA LLM is saved as its adapter alone, its base recorded by absolute path
    (training's default: no copy of a 7B base per run; `vistune merge-lora` makes a standalone folder)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    spec = bundle.spec
    model = bundle.model
    save_file({k: v.contiguous().cpu() for k, v in model.connector_state_dict().items()},
              str(tmp / PROJECTOR_FILE))
    bundle.tokenizer.save_pretrained(str(tmp / spec.tokenizer))
    bundle.image_processor.save_pretrained(str(tmp / spec.image_processor))

    vision = source_vision.model_copy(update={"path": str(Path(source_vision.path).resolve())})
    if save_frozen:
        # The tower is held in float32 during training, so this writes its source weights unchanged,
        # and only the vision half of a two-tower CLIP/SigLIP folder.
        model.vision.encoder.save_pretrained(str(tmp / "vision"))
        vision = vision.model_copy(update={"path": "vision"})

    llm = source_llm.model_copy(update={"path": str(Path(source_llm.path).resolve())})
    adapter = None
    if llm_mode == "full":
        _save_trained_llm(model.llm, tmp / "llm")  # safetensors
        llm = llm.model_copy(update={"path": "llm", "gguf_file": None})
    else:
        if save_frozen and (llm_mode != "lora" or copy_lora_base):
            _copy_source(source_llm.path, source_llm.gguf_file, tmp / "llm")
            llm = llm.model_copy(update={"path": "llm"})
        if llm_mode == "lora":
            model.llm.save_pretrained(str(tmp / "llm_adapter"))  # peft: adapter weights only
            adapter = "llm_adapter"
    spec = spec.model_copy(update={"vision": vision, "llm": llm, "llm_adapter": adapter})
    (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    # Move the parts in, vistune.json last: a folder is a complete checkpoint once it has one. `out`
    # may already hold other things (resume checkpoints, logs), which are left alone.
    out.mkdir(exist_ok=True)
    (out / SPEC_FILE).unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == SPEC_FILE):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    return out
