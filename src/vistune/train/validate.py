"""Check every stage of a run before any of them starts, and `vistune train --dry-run`.

A stage-2 mistake (a missing data file, a batch that does not divide over the GPUs, an option its
engine cannot honour) used to surface only after stage 1 had trained for hours. `check_run` looks at
every stage that will run, from the config and the file system alone (no weights are loaded), and
raises one ConfigError listing every problem, each naming its stage and key.

What an engine cannot do is data (`ENGINE_REFUSES`), so when an engine learns (or loses) an option
its entry is the one place to change.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import yaml

from vistune.config import RunConfig, StageConfig, stage_image_preprocess
from vistune.errors import ConfigError
from vistune.model.checkpoint import SPEC_FILE

# Stage options each engine refuses, with the reason; empty where it honours every option. DeepSpeed
# resumes through its own partitioned state (train/engine_state.py), so no engine refuses anything
# today; an option an engine cannot honour goes here, and both this check and --dry-run follow.
ENGINE_REFUSES: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "ddp": MappingProxyType({}),
    "fsdp": MappingProxyType({}),
    "zero2": MappingProxyType({}),
    "zero3": MappingProxyType({}),
})


def launch_processes() -> int:
    """The process count of this launch (torchrun / accelerate launch set WORLD_SIZE), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_launched(processes: int) -> bool:
    """Whether the stage's `distributed` engine applies (see train.distributed.make_accelerator)."""
    return "WORLD_SIZE" in os.environ or processes > 1


def engine_conflicts(stage: StageConfig, name: str) -> list[str]:
    """The options `stage` sets that its engine refuses, one message each."""
    refused = ENGINE_REFUSES[stage.distributed]
    return [f"[{name}] {option} is set but distributed: {stage.distributed} refuses it: {reason}"
            for option, reason in refused.items() if getattr(stage, option) is not None]


def _paths(cfg: RunConfig) -> list[str]:
    problems = []
    for key, path in (("model.vision.path", cfg.model.vision.path), ("model.llm.path", cfg.model.llm.path)):
        if not Path(path).is_dir():
            problems.append(f"{key}: folder {path} does not exist (vistune reads local folders only)")
    gguf = cfg.model.llm.gguf_file
    if gguf and Path(cfg.model.llm.path).is_dir() and not (Path(cfg.model.llm.path) / gguf).is_file():
        problems.append(f"model.llm.gguf_file: {gguf} is not in {cfg.model.llm.path}")
    return problems


def _file_problems(stage: StageConfig, name: str, earlier_outputs: dict[Path, str]) -> list[str]:
    problems = []
    if not Path(stage.data.path).is_file():
        problems.append(f"[{name}] data.path: {stage.data.path} does not exist")
    if stage.data.image_folder and not Path(stage.data.image_folder).is_dir():
        problems.append(f"[{name}] data.image_folder: {stage.data.image_folder} does not exist")
    if stage.projector_from:
        source = Path(stage.projector_from).resolve()
        if source not in earlier_outputs and not (source / SPEC_FILE).is_file():
            problems.append(f"[{name}] projector_from: {stage.projector_from} is not a vistune checkpoint and no "
                            "earlier stage of this run writes it; train that stage first or fix the path")
    return problems


def _engine_setup_problems(stage: StageConfig, name: str) -> list[str]:
    """What this machine lacks for the stage's engine, in a launched run (accelerate sets FSDP and
    DeepSpeed up on GPUs only, and DeepSpeed is an optional package)."""
    if "WORLD_SIZE" not in os.environ or stage.distributed == "ddp":
        return []
    problems = []
    if stage.distributed in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        problems.append(f"[{name}] distributed: {stage.distributed} needs DeepSpeed: pip install deepspeed")
    import torch  # here, not at the top: `--dry-run` without a launcher never needs it

    if not torch.cuda.is_available():
        problems.append(f"[{name}] distributed: {stage.distributed} runs on GPUs only (accelerate); use ddp or fsdp "
                        "on GPUs, ddp on CPUs")
    return problems


def _stage_problems(stage: StageConfig, name: str, processes: int, earlier_outputs: dict[Path, str],
                    check_files: bool) -> list[str]:
    """Everything wrong with one stage that can be seen without loading weights."""
    problems = [*_file_problems(stage, name, earlier_outputs), *_engine_setup_problems(stage, name)] \
        if check_files else []
    if stage.parts.projector == "frozen" and not stage.projector_from:
        problems.append(f"[{name}] parts.projector is frozen but no projector_from is given: the projector would "
                        "stay at its random initialisation")
    if stage.parts.projector == "frozen" and stage.parts.llm == "frozen":
        problems.append(f"[{name}] parts: nothing trains (projector and llm both frozen)")
    if Path(stage.output_dir).resolve() in earlier_outputs:
        other = earlier_outputs[Path(stage.output_dir).resolve()]
        problems.append(f"[{name}] output_dir {stage.output_dir} is also stage {other}'s: this stage would be skipped "
                        "as already finished")
    per_step = stage.micro_batch_size * processes
    if stage.global_batch_size % per_step:
        problems.append(f"[{name}] global_batch_size {stage.global_batch_size} is not a multiple of micro_batch_size "
                        f"{stage.micro_batch_size} x {processes} processes = {per_step}{_batch_hint(stage, name, processes)}")
    if is_launched(processes):
        problems += engine_conflicts(stage, name)
    return problems


def _chat_template_problems(cfg: RunConfig, stages: list[str]) -> list[str]:
    """`format: chat_template` needs a tokenizer that has one (loading the tokenizer only, no weights)."""
    from vistune.errors import CheckpointError
    from vistune.model.llm import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.llm.path, cfg.model.llm.gguf_file)
    except CheckpointError as e:
        return [f"model.llm.path: {e}"]
    if tokenizer.chat_template:
        return []
    return [f"[{name}] format: chat_template, but the tokenizer in {cfg.model.llm.path} has no chat template; "
            "use vicuna_v1 (LLaVA-1.5's) or another format" for name in stages]


def _batch_hint(stage: StageConfig, name: str, processes: int) -> str:
    """The largest micro batch not above the stage's that divides the global batch over the processes."""
    if stage.global_batch_size % processes:
        return f"; the global batch of {stage.global_batch_size} cannot be split over {processes} processes"
    per_process = stage.global_batch_size // processes
    fit = max(m for m in range(1, stage.micro_batch_size + 1) if per_process % m == 0)
    return f"; e.g. stages.{name}.micro_batch_size={fit}"


def check_run(cfg: RunConfig, processes: int, only: list[str] | None = None, check_files: bool = True) -> None:
    """Raise one ConfigError listing every problem of the stages that will run (all, or those in `only`).
    `check_files=False` checks the config alone (e.g. a documented command, away from its data and
    machine); True also checks files, folders, and, in a launched run, what the stage's engine needs."""
    unknown = [n for n in only or [] if n not in cfg.stages]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; this config has: {', '.join(cfg.stages)}")
    problems = _paths(cfg) if check_files else []
    outputs: dict[Path, str] = {}  # output folders of the stages before this one that run now
    templated: list[str] = []  # stages that will render with the tokenizer's own chat template
    for name, stage in cfg.stages.items():
        if only and name not in only:
            continue
        # A finished stage is skipped by the loop, so its data may be gone: check only its config.
        finished = (Path(stage.output_dir) / SPEC_FILE).is_file()
        problems += _stage_problems(stage, name, processes, outputs, check_files and not finished)
        outputs[Path(stage.output_dir).resolve()] = name
        if stage.format == "chat_template" and not finished:
            templated.append(name)
    if check_files and templated and not problems:
        problems += _chat_template_problems(cfg, templated)
    if problems:
        raise ConfigError(f"the run config has {len(problems)} problem(s), found before any stage started:\n  "
                          + "\n  ".join(problems))


def resolved_config(cfg: RunConfig, processes: int) -> str:
    """The config with every default filled in, as YAML, and what each stage's batch arithmetic gives."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120)
    lines = [text.rstrip(), "", f"# {processes} process(es)"]
    for name, stage in cfg.stages.items():
        accum = stage.global_batch_size // (stage.micro_batch_size * processes)
        engine = stage.distributed if is_launched(processes) else "one process, no engine"
        preprocess = stage_image_preprocess(cfg.model, stage)
        lines.append(f"# [{name}] {stage.global_batch_size} = {stage.micro_batch_size} per process x {processes} x "
                     f"{accum} accumulation steps; engine: {engine}; images: {preprocess}; "
                     f"format: {stage.format}; <image> placement: {stage.data.image_placement}")
    return "\n".join(lines)
