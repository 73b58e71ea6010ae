"""The language model and its tokenizer, loaded from a local HF folder (or a GGUF file in it)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vistune.errors import CheckpointError


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no tokenizer could be loaded ({e}); the LLM folder must hold its tokenizer") from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id serves; eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_llm(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = "sdpa") -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no causal LM could be loaded: {e}") from None
