"""The vision tower: any Hugging Face vision encoder, frozen, giving one hidden layer's tokens.

Loaded with transformers' Auto classes from a local folder. A full two-tower folder (CLIP, SigLIP)
is fine: only its vision half is built, from the folder's own `vision_config`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, BaseImageProcessor

from vistune.errors import CheckpointError
from vistune.images import pad_colour
from vistune.model.quiet import quiet_loading


def load_image_processor(path: str | Path) -> BaseImageProcessor:
    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: no image processor (preprocessor_config.json) could be loaded: {e}. "
            "Save the encoder's processor into the folder with `processor.save_pretrained(...)`."
        ) from None


def load_vision_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The vision half of the model in `path`, with pretrained weights."""
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a Hugging Face model folder: {e}") from None
    # Two-tower folders (CLIPModel, SiglipModel) keep the encoder's config under `vision_config`;
    # passing it to AutoModel builds CLIPVisionModel / SiglipVisionModel and loads its weights alone.
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        return AutoModel.from_pretrained(str(path), config=config, dtype=dtype)
    # The other tower's weights are expected to go unused; transformers would log each of them as
    # UNEXPECTED. Quiet that one logger for this one call (real errors still raise).
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        with quiet_loading():
            return AutoModel.from_pretrained(str(path), config=vision_config, dtype=dtype)
    finally:
        report_logger.setLevel(level)


def image_grid(config: object) -> int:
    """Number of patch tokens the encoder makes per image."""
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise CheckpointError(
            f"vision config {type(config).__name__} has no integer image_size/patch_size; "
            "vistune supports ViT-style encoders (CLIP, SigLIP, ...)"
        )
    return (image_size // patch_size) ** 2


class VisionTower(nn.Module):
    """Frozen encoder -> features of `select_layer`, patch tokens (and CLS, on request)."""

    def __init__(self, encoder: nn.Module, select_layer: int = -2,
                 select_feature: Literal["patch", "cls_patch"] = "patch") -> None:
        super().__init__()
        self.encoder = encoder
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.num_patches = image_grid(encoder.config)
        # The encoder's input side and patch side in pixels (integers: image_grid checked them).
        self.image_size: int = encoder.config.image_size
        self.patch_size: int = encoder.config.patch_size
        n_layers = encoder.config.num_hidden_layers
        # hidden_states holds the embeddings then one entry per layer: n_layers + 1 in all
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise CheckpointError(f"select_layer {select_layer} is out of range for an encoder of {n_layers} layers")
        # CLIP-style encoders put a learned CLS token before the patches; SigLIP has none. Read it off
        # the modules rather than the model's name.
        self.has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in encoder.modules())
        if select_feature == "cls_patch" and not self.has_cls:
            raise CheckpointError("select_feature `cls_patch` needs an encoder with a CLS token (SigLIP has none)")
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image after selection (576 for CLIP ViT-L/14-336 with `patch`)."""
        return self.num_patches + int(self.select_feature == "cls_patch")

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen: stay in eval mode whatever the parent module does (no dropout, fixed norms).
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> features [N, num_tokens, hidden_size]."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]  # [N, T, D], T = patches (+1 with CLS)
        if feats.shape[1] != self.num_patches + int(self.has_cls):
            raise RuntimeError(f"encoder made {feats.shape[1]} tokens, expected {self.num_patches} patches"
                               f"{' + CLS' if self.has_cls else ''}: is the image the encoder's size?")
        if self.select_feature == "patch" and self.has_cls:
            feats = feats[:, 1:]
        return feats


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred, as LLaVA-1.5's `pad` preprocessing does."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_images(images: list[Image.Image], processor: BaseImageProcessor,
                      mode: Literal["pad", "processor"]) -> torch.Tensor:
    """PIL images -> pixel_values [N, 3, H, W] (float32)."""
    images = [im.convert("RGB") for im in images]
    if mode == "pad":
        background = pad_colour(processor)
        images = [expand_to_square(im, background) for im in images]  # type: ignore[arg-type]
    return processor(images=images, return_tensors="pt")["pixel_values"]
