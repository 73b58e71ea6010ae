"""Image modes: how many encoder-sized tiles an image becomes, and how their features are laid out.

- `single` (LLaVA-1.5): one encoder-sized image, `T` tokens (576 for CLIP-L/14-336).
- `hd` (LLaVA-1.5-HD, paper section "Scaling to higher resolutions"): the image is padded to the
  grid's aspect ratio, resized to `rows x cols` encoder-sized tiles, each tile encoded on its own and
  the tile features merged back into one spatial map, row-major over the whole map; the features of
  the whole image downsampled to one tile (padded to a square, as `single` does) come first for global
  context. The order (global, then the merged map) is the LLaVA code's `spatial` patch merge.
- `anyres` (LLaVA-NeXT): per image, the best resolution among `image_grid_pinpoints`
  (transformers' `select_best_resolution`), resized keeping the aspect ratio and padded, cut into
  tiles; the merged map is unpadded (`unpad_image`) and a learned `image_newline` embedding ends each
  of its rows; the base (whole image squashed to one tile) comes first. Preprocessing is transformers'
  `LlavaNextImageProcessor` itself and the layout follows `LlavaNextModel.pack_image_features`, so a
  vistune `anyres` model and `LlavaNextForConditionalGeneration` see the same tensors.

The token count of an image is a pure function of its size (`ImageLayout.num_tokens`), so the chat
encoder lays out each image's run of placeholder ids before any model runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from transformers import BaseImageProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from vistune.config import VisionConfig
from vistune.errors import ConfigError
from vistune.images import carried_fields, pad_colour
from vistune.model.vision import VisionTower, expand_to_square, preprocess_images

ImageMode = Literal["single", "hd", "anyres"]


def default_pinpoints(tile: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT's grid pinpoints ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008] for a
    336 px encoder), scaled to an encoder of `tile` pixels: 1x2, 2x1, 2x2, 3x1, 1x3 tiles."""
    return [(tile, 2 * tile), (2 * tile, tile), (2 * tile, 2 * tile), (3 * tile, tile), (tile, 3 * tile)]


def unpadded_shape(height: int, width: int, map_h: int, map_w: int) -> tuple[int, int]:
    """The feature map's (rows, cols) left after `unpad_image` removes the padding rows/columns of an
    image of `height x width` resized into a `map_h x map_w` map (same arithmetic as transformers)."""
    if width / height > map_w / map_h:
        new_h = int(round(height * (map_w / width), 7))
        return map_h - 2 * ((map_h - new_h) // 2), map_w
    new_w = int(round(width * (map_h / height), 7))
    return map_h, map_w - 2 * ((map_w - new_w) // 2)


@dataclass(frozen=True)
class ImageLayout:
    """What an image becomes for one model: tiles to encode and tokens in the LLM's sequence."""

    mode: ImageMode
    tile: int  # encoder input side in pixels (336 for CLIP-L/14-336)
    side: int  # patches per tile side (24)
    tile_tokens: int  # tokens of one encoded image in `single` (side**2, +1 when the CLS token is kept)
    hd_grid: tuple[int, int] = (2, 2)  # (rows, cols)
    pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width) in pixels, for anyres

    @classmethod
    def build(cls, mode: ImageMode, tile: int, patch: int, tile_tokens: int, hd_grid: tuple[int, int] = (2, 2),
              pinpoints: list[tuple[int, int]] | None = None, max_tiles: int | None = None) -> ImageLayout:
        side = tile // patch
        if mode != "single" and tile_tokens != side * side:
            raise ConfigError(f"image_mode {mode!r} merges patch features into a spatial map; it needs "
                              "vision.select_feature: patch (no CLS token)")
        points = [tuple(int(x) for x in p) for p in (pinpoints or default_pinpoints(tile))]
        bad = [p for p in points if len(p) != 2 or p[0] % tile or p[1] % tile or min(p) <= 0]
        if mode == "anyres" and bad:
            raise ConfigError(f"image_grid_pinpoints {bad} are not [height, width] multiples of the encoder's "
                              f"{tile} px input")
        if max_tiles is not None:
            kept = [p for p in points if (p[0] // tile) * (p[1] // tile) <= max_tiles]
            if mode == "anyres" and not kept:
                raise ConfigError(f"max_tiles {max_tiles} leaves none of the image_grid_pinpoints {points}")
            points = kept
        return cls(mode, tile, side, tile_tokens, tuple(hd_grid), tuple(points))  # type: ignore[arg-type]

    @classmethod
    def for_model(cls, vision: VisionConfig, tower: VisionTower) -> ImageLayout:
        """The layout of a model from its vision config and its vision tower (the encoder's geometry)."""
        return cls.build(vision.image_mode, tower.image_size, tower.patch_size, tower.num_tokens, vision.hd_grid,
                         vision.image_grid_pinpoints, vision.max_tiles)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of `height x width` (besides the global/base tile)."""
        if self.mode == "hd":
            return self.hd_grid
        if self.mode == "anyres":
            best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
            return best_h // self.tile, best_w // self.tile
        return 0, 0

    def num_tiles(self, height: int, width: int) -> int:
        """Encoder inputs for one image: 1 in `single`, else the grid plus the global/base tile."""
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens the LLM sees for one image of `height x width` pixels."""
        if self.mode == "single":
            return self.tile_tokens
        rows, cols = self.grid(height, width)
        base = self.side * self.side
        if self.mode == "hd":
            return base * (1 + rows * cols)
        map_h, map_w = unpadded_shape(height, width, rows * self.side, cols * self.side)
        return base + map_h * (map_w + 1)  # + one image_newline per row of the unpadded map

    def merge(self, feats: torch.Tensor, sizes: torch.Tensor | list[tuple[int, int]],
              newline: torch.Tensor | None = None) -> torch.Tensor:
        """Tile features [N_tiles, side*side, D] of several images, in order -> [sum of tokens, D].
        `sizes`: (height, width) of each image."""
        if self.mode == "single":
            return feats.flatten(0, 1)
        out, start = [], 0
        s = self.side
        for height, width in (tuple(int(v) for v in hw) for hw in sizes):
            rows, cols = self.grid(height, width)
            n = 1 + rows * cols
            base, tiles = feats[start], feats[start + 1: start + n]  # [s*s, D], [rows*cols, s*s, D]
            start += n
            grid = tiles.reshape(rows, cols, s, s, -1)  # [r, c, y, x, D]
            if self.mode == "hd":
                # Row-major over the whole map: map row (r*s + y) holds tiles (r, 0..cols-1) side by side.
                out += [base, grid.permute(0, 2, 1, 3, 4).reshape(rows * s * cols * s, -1)]
                continue
            fmap = grid.permute(4, 0, 2, 1, 3).reshape(grid.shape[-1], rows * s, cols * s)  # [D, H, W]
            fmap = unpad_image(fmap, (height, width))  # [D, H', W']
            if newline is None:
                raise ValueError("anyres needs the image_newline embedding")
            ends = newline[:, None, None].expand(fmap.shape[0], fmap.shape[1], 1).to(fmap)  # [D, H', 1]
            fmap = torch.cat([fmap, ends], dim=-1)  # [D, H', W'+1]
            out += [base, fmap.flatten(1, 2).transpose(0, 1)]  # [s*s, D], [H'*(W'+1), D]
        if start != feats.shape[0]:
            raise ValueError(f"{feats.shape[0]} tiles given but the image sizes account for {start}")
        return torch.cat(out)


def _resize_tiles(image: Image.Image, rows: int, cols: int, tile: int,
                  background: tuple[int, int, int]) -> list[Image.Image]:
    """`hd`: pad the image to the grid's aspect ratio (centred, mean colour, as LLaVA-1.5's `pad`),
    resize to rows*tile x cols*tile, cut row-major into tiles."""
    w, h = image.size
    scale = max(w / cols, h / rows)
    canvas_w, canvas_h = max(w, round(scale * cols)), max(h, round(scale * rows))
    canvas = Image.new("RGB", (canvas_w, canvas_h), background)
    canvas.paste(image, ((canvas_w - w) // 2, (canvas_h - h) // 2))
    big = canvas.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    return [big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


def anyres_processor(source: BaseImageProcessor, layout: ImageLayout) -> BaseImageProcessor:
    """transformers' LlavaNext image processor with the encoder processor's resize/normalise settings
    and the layout's pinpoints; it does LLaVA-NeXT's resize-and-pad, tiling and base image."""
    try:  # the PIL backend (no torchvision needed), as the encoders' processors use
        from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
    except ImportError:
        from transformers import LlavaNextImageProcessor
    fields = carried_fields(source)
    # LlavaNext takes its tile side from crop_size (default 224): give it the encoder's when there is none.
    fields.setdefault("crop_size", {"height": layout.tile, "width": layout.tile})
    return LlavaNextImageProcessor(**fields, image_grid_pinpoints=[list(p) for p in layout.pinpoints])


class ImagePreprocessor:
    """PIL images -> (tiles [N_tiles, 3, S, S], sizes [N, 2] as (height, width)) for one model."""

    def __init__(self, layout: ImageLayout | None, processor: BaseImageProcessor,
                 image_preprocess: Literal["pad", "processor"]) -> None:
        self.layout = layout or ImageLayout("single", 0, 0, 0)  # `single` needs no geometry here
        self.processor = processor
        self.image_preprocess = image_preprocess
        self.anyres = anyres_processor(processor, self.layout) if self.layout.mode == "anyres" else None

    def num_tokens(self, image: Image.Image) -> int:
        w, h = image.size
        return self.layout.num_tokens(h, w)

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [im.convert("RGB") for im in images]
        sizes = torch.tensor([[im.size[1], im.size[0]] for im in images], dtype=torch.long)  # [N, 2] (H, W)
        if self.layout.mode == "single":
            return preprocess_images(images, self.processor, self.image_preprocess), sizes
        if self.anyres is not None:
            tiles = []
            for im in images:
                # One image per call: do_pad=False keeps each image's own tile count (no batch padding).
                out = self.anyres(images=[im], return_tensors="pt", do_pad=False)["pixel_values"]
                tiles.append(out[0] if isinstance(out, list) else out.reshape(-1, *out.shape[-3:]))
            return torch.cat([torch.as_tensor(t) for t in tiles]), sizes
        background = pad_colour(self.processor)
        rows, cols = self.layout.hd_grid
        crops: list[Image.Image] = []
        for im in images:
            # The global tile: as `single` preprocesses the image (padded to a square with `pad`).
            crops.append(expand_to_square(im, background) if self.image_preprocess == "pad" else im)  # type: ignore[arg-type]
            crops += _resize_tiles(im, rows, cols, self.layout.tile, background)  # type: ignore[arg-type]
        return self.processor(images=crops, return_tensors="pt")["pixel_values"], sizes

