"""Training: what trains per stage, the one loop, and resume checkpoints.

`describe_parts` (each part's trainable and total parameters) is public for the tools that show a
model, such as `vistune info`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vistune.train.parts import describe_parts

__all__ = ["describe_parts"]


def __getattr__(name: str) -> Any:
    """`describe_parts`, imported on first use: the CLI imports `vistune.train.signals` for every command,
    and that must not import torch (it keeps `--help` fast)."""
    if name == "describe_parts":
        from vistune.train.parts import describe_parts

        return describe_parts
    raise AttributeError(f"module 'vistune.train' has no attribute {name!r}")
