"""What a stage writes: resume points during training, and the finished model folder at its end.

Both run on every process: FSDP and DeepSpeed gather (or write) shards collectively, and the main process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.optim.lr_scheduler import LRScheduler
from transformers import BaseImageProcessor, PreTrainedTokenizerBase

import vistune
from vistune.config import ModelConfig, StageConfig, stage_image_preprocess
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, save_checkpoint
from vistune.model.vlm import VisionLanguageModel
from vistune.train.console import log
from vistune.train.distributed import is_sharded
from vistune.train.engine_state import save_engine_resume
from vistune.train.parts import apply_parts
from vistune.train.state import Progress, gather_state, save_resume


def save_resume_point(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: LRScheduler, stage: StageConfig, progress: Progress,
                      run_fingerprint: dict[str, Any]) -> None:
    """Write a resume checkpoint under OUTPUT_DIR/checkpoints (DeepSpeed: every process writes its partition)."""
    out = Path(stage.output_dir)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        save_engine_resume(accelerator, out, stage.distributed, scheduler, progress, stage.keep_checkpoints,
                           run_fingerprint)
        return
    state = gather_state(model, optimizer)  # on every process: FSDP gathers shards
    if accelerator.is_main_process:
        save_resume(out, state, scheduler, progress, stage.keep_checkpoints, fingerprint=run_fingerprint)
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, model: torch.nn.Module, model_cfg: ModelConfig, stage: StageConfig,
               name: str, progress: Progress, tokenizer: PreTrainedTokenizerBase,
               processor: BaseImageProcessor) -> Path:
    """Write the finished stage's model folder (on the main process; sharded weights are gathered first)."""
    out = Path(stage.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    spec = _final_spec(model_cfg, stage, name, unwrapped, progress)
    if is_sharded(accelerator, unwrapped):
        # FSDP / ZeRO-3: the folder is written from the gathered full weights, on the main process.
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            full = accelerator.get_state_dict(model)  # ZeRO-3's 16-bit gather (rank 0)
        else:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return out
        unwrapped = _unsharded_copy(model_cfg, stage, unwrapped, full)
    if accelerator.is_main_process and stage.parts.llm == "full" and stage.precision == "bf16":
        # A trained LLM is saved in the training dtype, as LLaVA does: half the bytes and the write time of its
        # float32 master weights (13 GB instead of 27 GB at 7B). Training is over; nothing reads them after.
        unwrapped.llm.to(torch.bfloat16)
    if accelerator.is_main_process:
        bundle = Bundle(unwrapped, tokenizer, processor, spec)
        save_checkpoint(out, bundle, spec.vision, model_cfg.llm, stage.parts.llm, stage.save_frozen,
                        copy_lora_base=False)
        log(f"[{name}] saved {out}")
    accelerator.wait_for_everyone()
    return out


def _unsharded_copy(model_cfg: ModelConfig, stage: StageConfig, sharded: VisionLanguageModel,
                    full: dict[str, torch.Tensor]) -> VisionLanguageModel:
    """A plain model holding FSDP's gathered weights, for `save_checkpoint` (main process)."""
    llm_dtype = next(p.dtype for p in sharded.llm.parameters())
    if stage.precision == "bf16":  # built in the dtype it is saved in: half the host memory of float32
        llm_dtype = torch.bfloat16
    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, torch.float32, llm_dtype)
    apply_parts(model, stage.parts, stage.lora, False)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if not k.startswith("vision.")]:
        raise RuntimeError(f"gathered FSDP weights do not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


def _final_spec(model_cfg: ModelConfig, stage: StageConfig, name: str, model: VisionLanguageModel,
                progress: Progress) -> ModelSpec:
    # The saved model records the preprocessing its (last) stage trained with: inference must match it.
    vision = model_cfg.vision.model_copy(update={"image_preprocess": stage_image_preprocess(model_cfg, stage)})
    return ModelSpec(
        vision=vision, llm=model_cfg.llm, projector=model_cfg.projector,
        vision_hidden_size=model.vision.hidden_size,
        llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
        num_image_tokens=model.num_image_tokens, conversation_format=stage.format,
        system_prompt=stage.system_prompt, model_max_length=stage.model_max_length,
        provenance={"stage": name, "steps": progress.step, "tokens": progress.tokens, "vistune": vistune.__version__,
                    "torch": torch.__version__, "parts": stage.parts.model_dump(),
                    "hyperparameters": stage.model_dump(exclude={"data", "parts"}), "data": stage.data.model_dump(),
                    "config": "config.yaml", "versions": "versions.json"},
    )
