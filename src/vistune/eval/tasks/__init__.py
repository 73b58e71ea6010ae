"""The benchmark tasks, by exact key. `get_task("pope")` builds one; unknown keys fail listing the valid ones."""

from __future__ import annotations

from typing import Any

from vistune.errors import ConfigError, RegistryKeyError
from vistune.eval.tasks.base import Item, Task
from vistune.eval.tasks.choice import SEED, MMBench, MMBenchCN, ScienceQA
from vistune.eval.tasks.demo import DemoTask
from vistune.eval.tasks.judged import LLaVABench, LLaVABenchCOCO, MMVet
from vistune.eval.tasks.vqa import GQA, TextVQA, VizWiz, VQAv2
from vistune.eval.tasks.yesno import MME, POPE

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    VQAv2, GQA, VizWiz, ScienceQA, TextVQA, POPE, MME, MMBench, MMBenchCN, SEED, LLaVABench, LLaVABenchCOCO,
    MMVet, DemoTask)}


def get_task(name: str, **options: Any) -> Task:
    """The task registered under exactly `name`, built with its options (only the demo takes any)."""
    if name not in TASKS:
        raise RegistryKeyError(f"unknown eval task {name!r}; valid: {', '.join(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError:
        raise ConfigError(f"task {name} does not take options {sorted(options)}; see its docstring: "
                          f"{(TASKS[name].__doc__ or '').strip().splitlines()[0]}") from None


__all__ = ["TASKS", "Item", "Task", "get_task"]
