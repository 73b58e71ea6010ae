"""vistune: visual instruction tuning (LLaVA, LLaVA-1.5) on any Hugging Face vision encoder and causal LM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vistune.infer.engine import Engine
    from vistune.infer.rows import Sampling

__all__ = ["Sampling", "__version__", "load"]


def load(path: str, device: str | None = None, dtype: Any = None, *, vision: str | None = None,
         llm: str | None = None, base: str | None = None) -> Engine:
    """Load a model folder for inference (vistune, a mid-run checkpoints/step-N, llava-hf, llava-next or
    original LLaVA, whose vision tower / LLM / base LLM it names by hub id are given as local `vision`,
    `llm`, `base` folders); see `vistune.infer.engine.Engine`."""
    # Imported here so that `import vistune` (and the CLI's --help) stays fast.
    from pathlib import Path

    from vistune.infer.engine import load as _load

    def local(p: str | None) -> Path | None:
        return Path(p) if p is not None else None

    return _load(path, device, dtype, local(vision), local(llm), local(base))


def __getattr__(name: str) -> Any:
    """`vistune.Sampling` (decoding settings), imported on first use so that `import vistune` stays fast."""
    if name == "Sampling":
        from vistune.infer.rows import Sampling

        return Sampling
    raise AttributeError(f"module 'vistune' has no attribute {name!r}")
