"""Chunked cross-entropy: the LM head and the loss a slice of tokens at a time.

A causal LM's own loss first materialises logits for every position, [B, T, V], and upcasts them to
float32: with a 128k-token vocabulary and 8 x 2048 tokens that is 8 GiB before the loss is taken.
Here only supervised positions reach the LM head at all (in LLaVA most positions are the prompt and the
576 image tokens, whose labels are ignored), and they go through it `chunk` rows at a time under
activation checkpointing, so at most one chunk's logits are alive in forward or backward. Written here
because transformers has no such loss for arbitrary causal LMs (Liger's fused kernel needs Triton/CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vistune.tokens import IGNORE_INDEX


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [n, V], freed after forward, recomputed in backward
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int,
                    num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """hidden [B, T, D] (the decoder's last hidden states), labels [B, T] unshifted (-100 ignored) ->
    sum of next-token cross-entropy over supervised positions / `num_items_in_batch` (default: their count).
    Equals transformers' `ForCausalLMLoss` on `head(hidden)`."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B*(T-1), D]
    y = labels[:, 1:].reshape(-1).to(h.device)  # [B*(T-1)]
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]  # [n, D], [n]
    # Starts from 0 x hidden, not a constant: with no supervised token the loss still reaches the graph,
    # so every process of a distributed run takes part in the backward all-reduce.
    total = (hidden.sum() * 0.0).float()
    for start in range(0, y.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, head, h[start: start + chunk], y[start: start + chunk],
                                   use_reentrant=False)
    denom = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom
