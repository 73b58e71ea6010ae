"""The vision-language model: vision tower -> projector -> features placed into the LLM's input embeddings.

Image positions are marked in `input_ids` by `IMAGE_TOKEN_ID`, one id per image token, so a
sequence's length already counts its image tokens (truncation and batching need no special case).
The id is negative: it is never looked up in the embedding table, so no row is added to the LLM's
vocabulary and a frozen LLM stays exactly as loaded. Placing the features is one boolean mask
(`masked_scatter`), the same for image samples, text-only samples and mixed batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vistune.errors import CheckpointError
from vistune.model.loss import chunked_lm_loss
from vistune.model.tiling import ImageLayout
from vistune.model.vision import VisionTower
from vistune.tokens import IMAGE_TOKEN_ID

NEWLINE_KEY = "image_newline"  # its key in the projector file: it trains and is saved with the projector


class VisionLanguageModel(nn.Module):
    """LLaVA: frozen vision tower, trainable projector, any HF causal LM (possibly peft-wrapped)."""

    def __init__(self, vision: VisionTower, projector: nn.Module, llm: PreTrainedModel,
                 layout: ImageLayout | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        if layout is None:
            cfg = vision.encoder.config
            layout = ImageLayout.build("single", cfg.image_size, cfg.patch_size, vision.num_tokens)
        self.layout = layout
        newline = None
        if self.layout.mode == "anyres":
            # LLaVA-NeXT's learned row-end embedding, initialised as LlavaNextModel does (std 1/sqrt(D)).
            dim = llm.get_input_embeddings().embedding_dim
            newline = nn.Parameter(torch.randn(dim) / math.sqrt(dim))  # [D]
        self.register_parameter(NEWLINE_KEY, newline)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> projected features [N, T, D_llm]."""
        feats = self.vision(pixel_values)  # [N, T, D_vis], no grad: the tower is frozen
        proj_dtype = next(self.projector.parameters(), feats).dtype
        return self.projector(feats.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] with IMAGE_TOKEN_ID runs, pixel_values [N_tiles, 3, H, W] in order -> embeds [B, L, D].
        `image_sizes` [N, 2] (height, width) of each image: needed by the `hd` and `anyres` image modes."""
        image_mask = input_ids == IMAGE_TOKEN_ID  # [B, L]
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # [B, L, D]
        n_slots = int(image_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"batch has {n_slots} image-token positions but no images")
            if self.training and any(p.requires_grad for p in self.projector.parameters()):
                # A text-only batch still sends one zero feature through the projector (adding 0 x it), so
                # the projector's weights (and anyres' row-end embedding) take part in every backward pass:
                # distributed engines (DDP, FSDP, ZeRO) expect the same trainable weights on every process.
                probe = self.projector(embeds.new_zeros(1, 1, self.vision.hidden_size,
                                                        dtype=next(self.projector.parameters()).dtype)).sum()
                if self.image_newline is not None:
                    probe = probe + self.image_newline.sum()
                embeds = embeds + 0.0 * probe.to(embeds.dtype)
            return embeds
        if self.layout.mode != "single" and image_sizes is None:
            raise ValueError(f"image_mode {self.layout.mode!r} needs image_sizes to lay out the tile features")
        # [N_tiles, T, D] -> [sum of each image's tokens, D]: tiles merged, unpadded, row ends added
        feats = self.layout.merge(self.image_features(pixel_values), image_sizes if image_sizes is not None else [],
                                  self.image_newline)
        if feats.shape[0] != n_slots:
            raise ValueError(f"batch has {n_slots} image-token positions but its images give {feats.shape[0]} "
                             f"features (image_mode {self.layout.mode!r})")
        # Row-major order of the mask is batch order then position: images fill their slots in order.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, image_sizes: torch.Tensor | None = None,
                loss_chunk_size: int | None = None, **kwargs: Any) -> Any:
        """Causal-LM output; with labels, the loss is summed over supervised tokens and divided by
        `num_items_in_batch` when given (so gradient accumulation weighs every token equally).
        `loss_chunk_size`: loss through `chunked_lm_loss` (no full logits; the output has loss only)."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        if loss_chunk_size is not None and labels is not None:
            hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)[0]
            loss = chunked_lm_loss(hidden, self.llm.get_output_embeddings(), labels, loss_chunk_size, num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """The LLM's own `generate` (KV cache, sampling, stopping) on the joined embeddings.
        Left-pad batches. Returns only the new tokens [B, new]."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """The projector's weights, plus `image_newline` in `anyres`: what the projector file holds."""
        state = {k: v.detach() for k, v in self.projector.state_dict().items()}
        if self.image_newline is not None:
            state[NEWLINE_KEY] = self.image_newline.detach()
        return state

    def load_connector_state(self, state: dict[str, torch.Tensor], where: str, need_newline: bool = True) -> None:
        """Load a projector file's weights; an `anyres` model also needs its `image_newline`, unless
        `need_newline` is False (a stage starting from another mode's projector keeps its fresh one)."""
        state = dict(state)
        newline = state.pop(NEWLINE_KEY, None)
        missing, unexpected = self.projector.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{where}: weights do not fit the projector (missing {missing}, "
                                  f"unexpected {unexpected})")
        if self.image_newline is None:
            return  # a single/hd model started from an anyres projector simply has no row-end embedding
        if newline is None and not need_newline:
            return
        if newline is None:
            raise CheckpointError(f"{where}: no {NEWLINE_KEY} for this anyres model; it was saved by a model "
                                  "with another image_mode")
        with torch.no_grad():
            self.image_newline.copy_(newline.to(self.image_newline))
