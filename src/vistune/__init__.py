"""vistune: visual instruction tuning (LLaVA, LLaVA-1.5) on any Hugging Face vision encoder and causal LM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vistune.infer.engine import Engine


def load(path: str, device: str | None = None, dtype: Any = None) -> Engine:
    """Load a vistune checkpoint folder for inference; see `vistune.infer.engine.Engine`."""
    # Imported here so that `import vistune` (and the CLI's --help) stays fast.
    from vistune.infer.engine import load as _load

    return _load(path, device, dtype)
