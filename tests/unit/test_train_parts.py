"""What trains, checked on the built model without a training run: requires_grad per part, gradients under
activation checkpointing, the projector's own learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistune.model.vlm import VisionLanguageModel
from vistune.train.parts import apply_parts


@pytest.mark.parametrize("llm_mode,llm_trains", [("frozen", False), ("full", True), ("lora", True)])
def test_parts_set_requires_grad(clip_dir: Path, llama_dir: Path, llm_mode: str, llm_trains: bool) -> None:
    """Per part: the vision tower never trains; the LLM trains fully, through LoRA only, or not at all."""
    from vistune.config import LLMConfig, LoraSettings, PartsConfig, VisionConfig
    from vistune.model.checkpoint import build_model

    model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir)), "mlp2x_gelu")
    assert isinstance(model, VisionLanguageModel)
    apply_parts(model, PartsConfig(projector="full", llm=llm_mode), LoraSettings(r=4, alpha=8), False)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert bool(trainable) == llm_trains
    if llm_mode == "lora":
        assert all("lora_" in n for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(clip_dir: Path, llama_dir: Path) -> None:
    """Align with a frozen LLM under activation checkpointing still reaches the projector, with the
    same gradients as without it."""
    from vistune.config import LLMConfig, LoraSettings, PartsConfig, VisionConfig
    from vistune.model.checkpoint import build_model
    from vistune.model.vlm import IMAGE_TOKEN_ID

    grads = []
    for checkpointing in (False, True):
        model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir)), "mlp2x_gelu")
        torch.manual_seed(0)
        model.projector.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        apply_parts(model, PartsConfig(projector="full", llm="frozen"), LoraSettings(), checkpointing)
        model.train()
        llm = model.llm
        on = llm.is_activation_checkpointing if hasattr(llm, "is_activation_checkpointing") else llm.is_gradient_checkpointing
        assert on == checkpointing
        ids = torch.tensor([[5] + [IMAGE_TOKEN_ID] * 16 + [7, 8, 9]])
        torch.manual_seed(1)
        out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), labels=ids.clamp(min=0))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.projector.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_projector_learning_rate_is_separate(clip_dir: Path, llama_dir: Path) -> None:
    from vistune.config import LLMConfig, LoraSettings, PartsConfig, VisionConfig
    from vistune.model.checkpoint import build_model
    from vistune.train.parts import param_groups

    model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir)), "mlp2x_gelu")
    apply_parts(model, PartsConfig(projector="full", llm="lora"), LoraSettings(r=4, alpha=8), False)
    groups = param_groups(model, lr=2e-4, projector_lr=2e-5, weight_decay=0.1)
    proj = {id(p) for p in model.projector.parameters()}
    for g in groups:
        in_proj = {id(p) in proj for p in g["params"]}
        assert len(in_proj) == 1
        assert g["lr"] == (2e-5 if in_proj.pop() else 2e-4)
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
