"""Options several `vistune` commands share, each declared once with its help and default.

tyro turns them into flags (`--max-new-tokens`, `--vision`, ...): the dataclasses are flattened into
their command's flags (no `generation.` prefix), the annotated aliases are single arguments. Kept apart
from `vistune.cli` so that the command modules of each area (`serve.cli`, `eval.cli`, `datagen.cli`)
can use them without importing the command table. Nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from tyro.conf import Positional, arg

if TYPE_CHECKING:  # torch loads inside the commands, keeping `vistune --help` instant
    from vistune.infer.engine import Sampling

MODEL_HELP = "model folder: vistune, a mid-run checkpoints/step-N, llava-hf, llava-next or original LLaVA"

#: The model folder, the first word after the command.
ModelPath = Annotated[Path, Positional, arg(metavar="MODEL", help=MODEL_HELP)]
Device = Annotated[str | None, arg(help="cpu, cuda, cuda:1 (None: cuda if available)")]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Parts:
    """Local copies of the parts an original-LLaVA folder only names by hub id."""

    vision: Path | None = None  # original LLaVA: local copy of the vision tower it names
    llm: Path | None = None  # original LLaVA stage 1 (mm_projector.bin): local copy of its LLM
    base: Path | None = None  # original LLaVA LoRA: local copy of the base LLM

    def kwargs(self) -> dict[str, Any]:
        """`vision=, llm=, base=` as the loaders take them."""
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """How an answer is decoded."""

    max_new_tokens: int = 512  # the longest answer, in tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    seed: int | None = None  # seed for sampling

    def sampling(self) -> Sampling:
        from vistune.infer.engine import Sampling

        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                        seed=self.seed)
