"""Projectors from vision features to the LLM's embedding space, named by exact registry keys.

Keys: `identity`, `linear` (LLaVA), `mlp{N}x_gelu` (N linear layers with GELU between them;
LLaVA-1.5 uses `mlp2x_gelu`). The grammar follows the original LLaVA code so its configs read the
same here; it lives in `vistune.registry_keys`, where the config checks keys without importing torch.
"""

from __future__ import annotations

from torch import nn

from vistune.errors import RegistryKeyError
from vistune.registry_keys import projector_depth


def build_projector(key: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """A fresh projector for `key`: [.., vision_dim] -> [.., llm_dim]."""
    depth = projector_depth(key)  # checks the key
    if key == "identity":
        if vision_dim != llm_dim:
            raise RegistryKeyError(f"projector 'identity' needs equal sizes, got vision {vision_dim} vs LLM {llm_dim}")
        return nn.Identity()
    if key == "linear":
        return nn.Linear(vision_dim, llm_dim)
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    # Sequential indices 0, 2, ... match LLaVA's `mm_projector.{0,2}` weight names.
    return nn.Sequential(*layers)
