"""Tiny, real parts for tests, benchmarks and one-off experiments, built offline in seconds.

The test suite's fixtures (`tests/conftest.py`) and the scripts in `benchmarks/` build their models
and data with these same functions: a byte-level BPE tokenizer with a ChatML template and a
Llama-style one, a two-tower CLIP and a SigLIP vision tower (32 px), a tiny Llama, and a LLaVA-format
data set of coloured rectangles whose answers are true of its images. Each is a folder that
`from_pretrained` (or `vistune train`) reads like a downloaded one.
"""

from vistune.testing.parts import (
    CHATML_TEMPLATE,
    build_bpe_tokenizer,
    build_clip,
    build_llama,
    build_siglip_vision,
    build_spm_tokenizer,
    smollm2_gguf,
)
from vistune.testing.world import COLOURS, IMAGE_SIZES, SYSTEM_PROMPT, build_dataset, corpus

__all__ = ["CHATML_TEMPLATE", "COLOURS", "IMAGE_SIZES", "SYSTEM_PROMPT", "build_bpe_tokenizer", "build_clip",
           "build_dataset", "build_llama", "build_siglip_vision", "build_spm_tokenizer", "corpus", "smollm2_gguf"]
