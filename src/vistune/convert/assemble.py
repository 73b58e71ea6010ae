"""Putting a vistune `Bundle` together from parts read out of another format: the model is composed by
`vistune.model.checkpoint.compose`, as every model is; here the parts' weights and the spec are added."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BaseImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vistune.config import LLMConfig, VisionConfig
from vistune.errors import CheckpointError
from vistune.model.checkpoint import Bundle, ModelSpec, compose


def causal_lm_from_state(config: PretrainedConfig, state: dict[str, torch.Tensor], where: str,
                         dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM of `config` holding exactly `state` (every weight present, none left over).
    transformers' own loader does the work (meta init, tied weights, buffers)."""
    # The Auto class wants a path; the concrete class also takes `None` with a state_dict.
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or next(iter(state.values())).dtype,
        output_loading_info=True,
    )
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = sorted(set(info["missing_keys"]) - tied)
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise CheckpointError(f"{where}: the LLM weights do not fit a {type(model).__name__} "
                              f"(missing {missing[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]}, "
                              f"mismatched shapes {sorted(info['mismatched_keys'])[:5]})")
    return model.eval()


def assemble(encoder: nn.Module, vision: VisionConfig, projector_key: str, projector_state: dict[str, torch.Tensor],
             llm: nn.Module, llm_cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase,
             image_processor: BaseImageProcessor, conversation_format: str, system_prompt: str | None,
             model_max_length: int, provenance: dict[str, object], where: str | Path) -> Bundle:
    """A Bundle whose spec describes the parts; paths in it say where the parts came from."""
    model = compose(encoder, vision, llm, projector_key).eval()
    dtype = next(llm.parameters()).dtype  # the connector is stored in the LLM's dtype
    model.projector.to(dtype)
    if model.image_newline is not None:
        model.image_newline.data = model.image_newline.data.to(dtype)
    # The projector's weights, and `image_newline` for anyres (the reader puts it in the same dict).
    model.load_connector_state(projector_state, str(where))
    spec = ModelSpec(
        vision=vision, llm=llm_cfg, projector=projector_key, vision_hidden_size=model.vision.hidden_size,
        llm_hidden_size=llm.get_input_embeddings().embedding_dim, num_image_tokens=model.num_image_tokens,
        conversation_format=conversation_format, system_prompt=system_prompt, model_max_length=model_max_length,
        provenance=provenance,
    )
    return Bundle(model, tokenizer, image_processor, spec)
