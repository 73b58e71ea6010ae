"""The model's parts against transformers' own classes: the vision tower's features, the LLM's logits on the
embeddings vistune builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel

from vistune.config import LLMConfig, VisionConfig
from vistune.model.checkpoint import build_model
from vistune.model.vision import VisionTower, load_vision_encoder
from vistune.model.vlm import IMAGE_TOKEN_ID


def test_clip_penultimate_patch_features(clip_dir: Path) -> None:
    tower = VisionTower(load_vision_encoder(clip_dir), select_layer=-2, select_feature="patch")
    ref = CLIPVisionModel.from_pretrained(str(clip_dir))
    x = torch.randn(2, 3, 32, 32)
    feats = tower(x)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert feats.shape == (2, 16, 32) and tower.num_tokens == 16
    torch.testing.assert_close(feats, expected)
    with_cls = VisionTower(load_vision_encoder(clip_dir), select_layer=-1, select_feature="cls_patch")
    assert with_cls(x).shape == (2, 17, 32) and with_cls.num_tokens == 17
    assert not any(p.requires_grad for p in tower.parameters())


@pytest.fixture(scope="module")
def vlm(clip_dir: Path, llama_dir: Path):
    model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir)), "mlp2x_gelu")
    return model.eval()


def test_image_features_replace_placeholders(vlm, llama_dir: Path) -> None:
    n = vlm.num_image_tokens
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN_ID] * n + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    embeds = vlm.embed(ids, pixels)
    table = vlm.llm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0, :2], table[[5, 6]])
    torch.testing.assert_close(embeds[0, 2:2 + n], vlm.image_features(pixels)[0])
    # the reference: the LLM run on the same embeddings it would build itself
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    out = vlm(ids, torch.ones_like(ids), pixels).logits
    torch.testing.assert_close(out, ref(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits)
