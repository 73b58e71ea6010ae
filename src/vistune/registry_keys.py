"""The exact keys a config may name for parts built elsewhere: projectors and trackers.

The config checks its keys here, so reading a config imports neither torch (projectors are built by
`vistune.model.projector`) nor the training code (trackers are accelerate's, used by
`vistune.train.tracking`). Conversation format keys live with the formats (`vistune.chat.formats`), a
layer below the config.
"""

from __future__ import annotations

import re
from typing import Any

from vistune.errors import RegistryKeyError

_MLP = re.compile(r"mlp([1-9][0-9]*)x_gelu")
PROJECTOR_KEYS = ("identity", "linear", "mlp{N}x_gelu")


def projector_depth(key: str) -> int:
    """Linear layers of the projector `key` names: 0 for `identity`, 1 for `linear`, N for `mlp{N}x_gelu`
    (the original LLaVA's grammar); a RegistryKeyError for any other key."""
    if key == "identity":
        return 0
    if key == "linear":
        return 1
    match = _MLP.fullmatch(key)
    if match is None:
        raise RegistryKeyError(f"unknown projector {key!r}; valid keys: {', '.join(PROJECTOR_KEYS)} (e.g. mlp2x_gelu)")
    return int(match.group(1))


def check_projector_key(key: str) -> str:
    projector_depth(key)
    return key


def tracker_keys() -> list[str]:
    # Imported on use: accelerate imports torch, which reading a config does not need.
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(value: Any) -> list[str]:
    """`report_to` as a list of accelerate tracker keys: a key or a list of keys; `none` or [] for none."""
    keys = [value] if isinstance(value, str) else list(value or [])
    if keys in (["none"], ["None"]):
        return []
    valid = tracker_keys()
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise RegistryKeyError(f"unknown tracker(s) {unknown} in report_to; valid: {', '.join(valid)}, or none")
    return list(dict.fromkeys(keys))
