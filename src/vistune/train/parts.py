"""What trains in a stage: each part frozen, full or LoRA, set explicitly and reported.

As in prismatic's `freeze_backbones`, a stage sets `requires_grad` part by part and says exactly
what trains, so "did my LLM really stay frozen?" is answered by the log, not by reading code.
"""

from __future__ import annotations

from torch import nn

from vistune.config import LoraSettings, PartsConfig
from vistune.model.vlm import VisionLanguageModel


def apply_parts(model: VisionLanguageModel, parts: PartsConfig, lora: LoraSettings,
                gradient_checkpointing: bool) -> None:
    """Set requires_grad per part; wrap the LLM with a peft LoRA adapter when `llm: lora`."""
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(parts.projector == "full")
    if model.image_newline is not None:  # anyres' row-end embedding belongs to the connector: trains with it
        model.image_newline.requires_grad_(parts.projector == "full")
    model.llm.requires_grad_(parts.llm == "full")
    if gradient_checkpointing:
        # Non-reentrant checkpointing gives correct gradients even when the LLM's own inputs
        # (token embeddings) do not require grad, which is the case in every LLaVA stage.
        # transformers renamed gradient_* to activation_checkpointing_* in 5.x; use whichever exists.
        enable = getattr(model.llm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.config.use_cache = False
    if parts.llm == "lora":
        from peft import LoraConfig, get_peft_model

        from vistune.model.quiet import quiet_loading

        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        with quiet_loading():  # peft's version-mismatch FutureWarning (see model/quiet.py)
            model.llm = get_peft_model(model.llm, config)


def count(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def describe_parts(model: VisionLanguageModel) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters of each part (vision, projector, llm), as `vistune info` shows them.
    The projector's are its own weights; `describe` adds anyres' row-end embedding, which trains with it."""
    return {name: count(getattr(model, name)) for name in ("vision", "projector", "llm")}


def describe(model: VisionLanguageModel) -> str:
    """One line per part: trainable / total parameters."""
    lines = []
    for name, (trainable, total) in describe_parts(model).items():
        newline = model.image_newline
        if name == "projector" and newline is not None:  # anyres' row-end embedding counts with the projector
            total += newline.numel()
            trainable += newline.numel() if newline.requires_grad else 0
        state = "frozen" if trainable == 0 else "trains"
        lines.append(f"  {name:<9} {state:<6} {trainable:>13,} / {total:>13,} parameters")
    return "\n".join(lines)


def param_groups(model: VisionLanguageModel, lr: float, projector_lr: float | None,
                 weight_decay: float) -> list[dict]:
    """Projector and LLM as separate groups (separate learning rates); no decay on biases and norms."""
    groups = []
    for part, part_lr in ((model.projector, projector_lr or lr), (model.llm, lr)):
        decay, no_decay = [], []
        params = list(part.parameters())
        if part is model.projector and model.image_newline is not None:
            params.append(model.image_newline)
        for p in params:
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": part_lr, "weight_decay": wd})
    return groups
