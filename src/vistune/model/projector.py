"""Projectors from vision features to the LLM's embedding space, named by exact registry keys.

Keys: `identity`, `linear` (LLaVA), `mlp{N}x_gelu` (N linear layers with GELU between them;
LLaVA-1.5 uses `mlp2x_gelu`). The grammar follows the original LLaVA code so its configs read the
same here.
"""

from __future__ import annotations

import re

from torch import nn

from vistune.errors import RegistryKeyError

_MLP = re.compile(r"mlp([1-9][0-9]*)x_gelu")
PROJECTOR_KEYS = ("identity", "linear", "mlp{N}x_gelu")


def check_projector_key(key: str) -> str:
    if key not in ("identity", "linear") and not _MLP.fullmatch(key):
        raise RegistryKeyError(f"unknown projector {key!r}; valid keys: {', '.join(PROJECTOR_KEYS)} (e.g. mlp2x_gelu)")
    return key


def build_projector(key: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """A fresh projector for `key`: [.., vision_dim] -> [.., llm_dim]."""
    check_projector_key(key)
    if key == "identity":
        if vision_dim != llm_dim:
            raise RegistryKeyError(f"projector 'identity' needs equal sizes, got vision {vision_dim} vs LLM {llm_dim}")
        return nn.Identity()
    if key == "linear":
        return nn.Linear(vision_dim, llm_dim)
    depth = int(_MLP.fullmatch(key).group(1))  # type: ignore[union-attr]  # checked above
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    # Sequential indices 0, 2, ... match LLaVA's `mm_projector.{0,2}` weight names.
    return nn.Sequential(*layers)
