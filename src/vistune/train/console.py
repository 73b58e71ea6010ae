"""Progress messages of a run, written once (by the first process), above any progress bar."""

from __future__ import annotations

from accelerate import PartialState
from tqdm.auto import tqdm


def log(msg: str) -> None:
    """Progress messages, from the first process only (once per run, not once per GPU)."""
    if PartialState._shared_state and not PartialState().is_main_process:
        return
    tqdm.write(msg)
