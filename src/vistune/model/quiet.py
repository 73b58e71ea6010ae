"""Silence the messages every model load prints that say nothing about the user's model.

Scoped to the calls that print them (a context manager), never process-wide, so the same messages
from other code, and every other warning, still show:

- transformers' "The following layers were not sharded: ..." (~600 characters, one name per vision
  layer). transformers checks a model's tensor-parallel plan on every load, also when no tensor
  parallelism is used; a vision encoder read out of a two-tower CLIP/SigLIP folder keeps a plan
  that names none of its layers, so the whole tower is listed. vistune never shards a model with
  tensor parallelism, so the list means nothing here and reads like a failure.
- peft's FutureWarning "`is_gradient_checkpointing` is deprecated": peft reads that transformers
  attribute when wrapping a model with LoRA; it is a peft/transformers version matter, fixed by
  upgrading peft, and nothing a vistune user can act on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_TP_LOGGER = "transformers.distributed.tensor_parallel"
_PEFT_DEPRECATION = r".*`is_gradient_checkpointing` is deprecated"


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Within the block: no tensor-parallel plan report, no peft gradient-checkpointing deprecation."""
    tp_logger = logging.getLogger(_TP_LOGGER)
    level = tp_logger.level
    tp_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
            yield
    finally:
        tp_logger.setLevel(level)
