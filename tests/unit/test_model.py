"""The model's parts: projector registry, vision feature selection, placing image features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vistune.config import LLMConfig, VisionConfig
from vistune.errors import CheckpointError, RegistryKeyError
from vistune.model.checkpoint import build_model
from vistune.model.projector import build_projector
from vistune.model.vision import VisionTower, expand_to_square, load_image_processor, load_vision_encoder, preprocess_images
from vistune.model.vlm import IMAGE_TOKEN_ID


def test_projector_registry() -> None:
    assert isinstance(build_projector("linear", 8, 16), torch.nn.Linear)
    mlp = build_projector("mlp2x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert len(build_projector("mlp3x_gelu", 8, 16)) == 5
    assert build_projector("mlp2x_gelu", 8, 16)(torch.zeros(2, 3, 8)).shape == (2, 3, 16)
    assert isinstance(build_projector("identity", 8, 8), torch.nn.Identity)
    with pytest.raises(RegistryKeyError, match="valid keys: identity, linear, mlp{N}x_gelu"):
        build_projector("mlp2x_relu", 8, 16)
    with pytest.raises(RegistryKeyError):
        build_projector("mlp0x_gelu", 8, 16)  # exact grammar: N >= 1


def test_siglip_has_no_cls(siglip_dir: Path) -> None:
    tower = VisionTower(load_vision_encoder(siglip_dir))
    assert not tower.has_cls and tower(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(CheckpointError, match="CLS"):
        VisionTower(load_vision_encoder(siglip_dir), select_feature="cls_patch")


def test_pad_preprocessing_fills_with_mean_colour(clip_dir: Path) -> None:
    processor = load_image_processor(clip_dir)
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(wide, (1, 2, 3))
    assert square.size == (40, 40) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((20, 20)) == (255, 0, 0)
    padded = preprocess_images([wide], processor, "pad")
    cropped = preprocess_images([wide], processor, "processor")
    assert padded.shape == cropped.shape == (1, 3, 32, 32)
    # the padded band normalises to ~0: it is the processor's mean colour
    assert padded[0, :, 0, 16].abs().max() < 0.02
    assert not torch.allclose(padded, cropped)


@pytest.fixture(scope="module")
def vlm(clip_dir: Path, llama_dir: Path):
    model = build_model(VisionConfig(path=str(clip_dir)), LLMConfig(path=str(llama_dir)), "mlp2x_gelu")
    return model.eval()


def test_mixed_batch_matches_single_samples(vlm) -> None:
    """An image sample and a text-only sample in one (right-padded) batch give the same logits as alone."""
    n = vlm.num_image_tokens
    a = [5] + [IMAGE_TOKEN_ID] * n + [7, 8, 9]
    b = [10, 11, 12]
    pixels = torch.randn(1, 3, 32, 32)
    batch = torch.full((2, len(a)), 0)
    batch[0], batch[1, :3] = torch.tensor(a), torch.tensor(b)
    mask = torch.zeros_like(batch)
    mask[0], mask[1, :3] = 1, 1
    with torch.no_grad():
        both = vlm(batch, mask, pixels).logits
        alone_a = vlm(torch.tensor([a]), torch.ones(1, len(a), dtype=torch.long), pixels).logits
        alone_b = vlm(torch.tensor([b]), torch.ones(1, 3, dtype=torch.long)).logits
    torch.testing.assert_close(both[0], alone_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1, :3], alone_b[0], atol=1e-5, rtol=1e-4)


def test_image_count_mismatch_is_an_error(vlm) -> None:
    ids = torch.tensor([[5] + [IMAGE_TOKEN_ID] * vlm.num_image_tokens])
    with pytest.raises(ValueError, match="image-token positions"):
        vlm.embed(ids, None)
