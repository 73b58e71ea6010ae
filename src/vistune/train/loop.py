"""The one training loop. A stage (align, finetune, ...) only changes what it is given.

Gradient accumulation weighs every supervised token equally: the loss of each micro-batch is summed
over its tokens and divided by the number of supervised tokens in the whole accumulation window
(transformers' `num_items_in_batch`), rather than averaging per-micro-batch means, which would
overweight short samples.
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from transformers import BaseImageProcessor, PreTrainedTokenizerBase, get_scheduler

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import get_format
from vistune.config import ModelConfig, RunConfig, StageConfig, stage_image_preprocess
from vistune.data.batch import Collated
from vistune.data.dataset import SupervisedDataset
from vistune.data.precheck import CountOnce
from vistune.data.records import Problems, Sample, load_samples
from vistune.data.rules import apply_rules
from vistune.errors import ConfigError
from vistune.model.checkpoint import SPEC_FILE, build_model, load_projector
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.model.vlm import VisionLanguageModel
from vistune.train.parts import apply_parts, describe, param_groups
from vistune.train.distributed import (ShardedBatchSampler, compile_layers, loss_scale, make_accelerator,
                                       process_state, reset_engine, set_window_end, wrap_policy_for)
from vistune.train.packing import flatten_rows
from vistune.train.console import log
from vistune.train.validate import check_run
from vistune.train.engine_state import check_resumable, load_engine_resume
from vistune.train.provenance import data_identity, fingerprint, resume_checkpoints, write_run_files
from vistune.train.signals import SaveClock, StopRequests, TrainingInterrupted
from vistune.train.stage_data import (build_validator, hint_bad_samples, precheck_stage, report_problems,
                                     training_loader)
from vistune.train.saving import save_final, save_resume_point
from vistune.train.state import Progress, list_checkpoints, load_resume
from vistune.train.tracking import Dashboard, Metrics, accelerator_kwargs
from vistune.train.validation import Validator, split_validation


def run(cfg: RunConfig, only: list[str] | None = None, allow_config_change: bool = False) -> dict[str, Path]:
    """Train the stages in order (or only those named); a stage whose output is complete is skipped.
    `allow_config_change`: resume even when the checkpoint was written under another config or data."""
    cfg = cfg.resolved()  # `projector_from: align` -> align's output_dir
    state = process_state(cfg.collective_timeout_minutes)  # the processes join here, with the run's timeout
    # Every stage is checked before the first one starts: a stage-2 mistake must not wait for stage 1.
    check_run(cfg, state.num_processes, only)
    outputs = {}
    for name, stage in cfg.stages.items():
        if only and name not in only:
            continue
        done = train_stage(cfg.model, stage, name, allow_config_change)
        if done is None:  # stopped early (stop_after_steps): later stages need this one finished
            break
        outputs[name] = done
    return outputs


def train_stage(model_cfg: ModelConfig, stage: StageConfig, name: str = "stage",
                allow_config_change: bool = False) -> Path | None:
    """Train one stage; returns its output folder, or None when it stopped early to be resumed (a signal
    raises TrainingInterrupted after saving). `allow_config_change`: resume from a checkpoint written under
    another config or data."""
    with tf32_matmuls(stage.tf32, torch.cuda.is_available()):
        return _train_stage(model_cfg, stage, name, allow_config_change)


def _train_stage(model_cfg: ModelConfig, stage: StageConfig, name: str, allow_config_change: bool) -> Path | None:
    """Prepare the stage, fit it, then report what was skipped and save the model (or stop to be resumed)."""
    out = Path(stage.output_dir)
    if (out / SPEC_FILE).is_file():
        log(f"[{name}] {out} already holds a finished model; skipping (delete it or change output_dir to retrain)")
        return out
    run = _prepare(model_cfg, stage, name, allow_config_change)
    stop = _fit(run)
    report_problems(name, run.problems, run.truncated, out)
    if stop is not None:
        return _stopped(name, out, run.progress, stop.signum)
    return save_final(run.accelerator, run.model, model_cfg, stage, name, run.progress, run.tokenizer, run.processor)


@dataclass
class _Stage:
    """What the steps of a stage share, built by `_prepare` in the order that keeps a seed's run the same."""

    name: str
    model_cfg: ModelConfig
    stage: StageConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as wrapped by accelerate (DDP, FSDP, DeepSpeed)
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    loader: DataLoader
    sampler: ShardedBatchSampler
    validator: Validator | None
    opts: _RunOptions
    tokenizer: PreTrainedTokenizerBase
    processor: BaseImageProcessor
    problems: CountOnce  # records skipped, counted once each (restored on resume)
    truncated: CountOnce  # records kept with some reply tokens cut
    progress: Progress
    accum: int  # micro-batches per optimizer step on each process
    world: int
    total_steps: int
    run_fingerprint: dict[str, Any]


def _prepare(model_cfg: ModelConfig, stage: StageConfig, name: str, allow_config_change: bool) -> _Stage:
    """Seeds, data, engine, model, loader, optimizer and resume point. Data first: a bad record must stop the
    run before minutes go into loading weights."""
    accum, world = _start(stage)
    problems, truncated = CountOnce(), CountOnce()
    samples, val_samples = _read_samples(stage, problems)
    out = Path(stage.output_dir)
    accelerator = make_accelerator(stage.distributed, stage.precision, accum, stage.micro_batch_size,
                                   stage.max_grad_norm, **accelerator_kwargs(stage.report_to, out))
    run_fingerprint = fingerprint(model_cfg, stage, data_identity(stage.data.path, [s.id for s in samples]), world)
    checkpoints = resume_checkpoints(out, stage, name, run_fingerprint, allow_config_change, accelerator)
    model, tokenizer, processor = _build_model(model_cfg, stage, name)
    encoder = ChatEncoder(tokenizer, get_format(stage.format, stage.system_prompt), model.num_image_tokens,
                          stage.model_max_length)
    lengths = None
    if stage.data.precheck:
        samples, lengths = precheck_stage(stage, samples, encoder, model, problems, truncated)
    dataset = SupervisedDataset(samples, encoder, processor, stage_image_preprocess(model_cfg, stage),
                                stage.data.on_bad_sample == "skip", lengths, layout=model.layout)
    validator = build_validator(name, stage, val_samples, encoder, processor, model_cfg, model, problems, accelerator)
    loader, sampler = training_loader(stage, dataset, tokenizer.pad_token_id, accelerator)
    batches_per_epoch = len(sampler.batches(0))  # over all processes
    steps_per_epoch = math.ceil(batches_per_epoch / (accum * world))
    total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    model, optimizer, scheduler = _optimize(stage, model, accelerator, total_steps)
    opts = _RunOptions(accelerator, loss_scale(accelerator, accum), stage.loss_chunk_size,
                       flatten=stage.data.packing and model_cfg.llm.attn_implementation == "flash_attention_2")
    run = _Stage(name, model_cfg, stage, accelerator, model, optimizer, scheduler, loader, sampler, validator, opts,
                 tokenizer, processor, problems, truncated, Progress(), accum, world, total_steps, run_fingerprint)
    if checkpoints:
        _resume(run, checkpoints[-1])
    log(f"[{name}] {len(dataset)} samples, {batches_per_epoch} batches of {stage.micro_batch_size} per epoch, "
        f"{accum} per step on each of {world} processes, {total_steps} steps")
    return run


def _start(stage: StageConfig) -> tuple[int, int]:
    """Seed the stage and give it a fresh engine; returns (micro-batches per step per process, processes)."""
    random.seed(stage.seed)
    torch.manual_seed(stage.seed)
    # accelerate keeps one process-wide AcceleratorState and refuses a later Accelerator with another
    # mixed_precision, so a run whose stages differ in precision (align fp32, finetune bf16) would fail
    # at stage 2. Each stage starts from a fresh one, as transformers' Trainer does; the PartialState
    # (processes, device) is kept.
    reset_engine()
    world = process_state().num_processes
    if stage.global_batch_size % (stage.micro_batch_size * world):
        raise ConfigError(f"global_batch_size {stage.global_batch_size} is not a multiple of micro_batch_size "
                          f"{stage.micro_batch_size} x {world} processes")
    return stage.global_batch_size // (stage.micro_batch_size * world), world


def _read_samples(stage: StageConfig, problems: Problems) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples), read and checked, with the stage's image-placement rules applied."""
    samples = load_samples(stage.data.path, stage.data.image_folder, stage.data.on_bad_sample == "skip", problems)
    samples, val_samples = split_validation(stage, samples, problems)
    return apply_rules(samples, stage.data.image_placement), apply_rules(val_samples, stage.data.image_placement)


def _build_model(model_cfg: ModelConfig, stage: StageConfig, name: str
                 ) -> tuple[VisionLanguageModel, PreTrainedTokenizerBase, BaseImageProcessor]:
    """The model with the stage's parts set to train or stay frozen, its tokenizer and image processor."""
    # Trained weights stay float32 (autocast computes in bf16); a frozen LLM is held in bf16 to halve
    # its memory. The vision tower stays float32: it is small next to the LLM, autocast runs it in
    # bf16 anyway, and a copy saved from it equals its source.
    llm_dtype = torch.bfloat16 if stage.precision == "bf16" and stage.parts.llm != "full" else torch.float32
    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, torch.float32, llm_dtype)
    tokenizer = load_tokenizer(model_cfg.llm.path, model_cfg.llm.gguf_file)
    processor = load_image_processor(model_cfg.vision.path)
    if stage.projector_from:
        load_projector(model, stage.projector_from, model_cfg.projector)
        log(f"[{name}] projector loaded from {stage.projector_from}")
    apply_parts(model, stage.parts, stage.lora, stage.gradient_checkpointing)
    if stage.compile:
        compile_layers(model.llm)
    log(f"[{name}] what trains:\n{describe(model)}")
    return model, tokenizer, processor


def _optimize(stage: StageConfig, model: VisionLanguageModel, accelerator: Accelerator, total_steps: int
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler]:
    """AdamW and the learning-rate schedule; the model and optimizer wrapped by the engine (DDP/FSDP/DeepSpeed)."""
    # Fused AdamW (one kernel for all parameters) on CUDA; the weights are moved there by `prepare`.
    optimizer = torch.optim.AdamW(param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay),
                                  lr=stage.lr, betas=(0.9, 0.999), fused=accelerator.device.type == "cuda")
    scheduler = get_scheduler(stage.lr_schedule, optimizer, math.ceil(stage.warmup_ratio * total_steps), total_steps)
    wrap_policy_for(accelerator, model.llm)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return wrapped, optimizer, scheduler


def _resume(run: _Stage, checkpoint: Path) -> None:
    """Load a resume checkpoint's weights, optimizer and scheduler (DeepSpeed: through its own state), its
    progress and its counts of skipped records."""
    deepspeed = run.accelerator.distributed_type == DistributedType.DEEPSPEED
    check_resumable(checkpoint, run.stage.distributed, deepspeed, run.world)
    run.progress = (load_engine_resume(run.accelerator, checkpoint, run.scheduler) if deepspeed
                    else load_resume(checkpoint, run.model, run.optimizer, run.scheduler))
    run.problems.restore(run.progress.skipped, run.progress.skipped_seen)
    log(f"[{run.name}] resumed from {checkpoint} (step {run.progress.step}/{run.total_steps})")


@dataclass(frozen=True)
class _Stop:
    """A stage stopped before its last step, after a resume save, by a signal (`signum`) or stop_after_steps (None)."""
    signum: int | None


def _fit(run: _Stage) -> _Stop | None:
    """Optimizer steps, epoch after epoch, until the last one or an early stop (stop_after_steps, or a signal:
    SIGTERM/SIGUSR1/Ctrl-C save at the next step boundary)."""
    if run.accelerator.is_main_process:  # config.yaml (step-N folders are rebuilt from it) and versions.json
        write_run_files(Path(run.stage.output_dir), run.model_cfg, run.stage, run.name)
    metrics = Metrics(Path(run.stage.output_dir), run.accelerator, run.name, run.stage.model_dump(mode="json"),
                      run.progress.step, run.progress.tokens, run.stage.log_every)
    dashboard = Dashboard(metrics, run.total_steps, run.progress.step, run.name, run.accelerator.is_main_process)
    run.model.train()
    progress, stop = run.progress, None
    with StopRequests() as requests:
        clock = SaveClock(run.stage.save_every, run.stage.save_every_minutes, run.stage.stop_after_steps, requests)
        while progress.step < run.total_steps:
            stop = _epoch(run, clock, dashboard)
            if stop is not None:
                break
            if progress.step < run.total_steps:
                progress.epoch += 1
                progress.batches_in_epoch = 0
    dashboard.close()
    return stop


def _epoch(run: _Stage, clock: SaveClock, dashboard: Dashboard) -> _Stop | None:
    """The rest of the current epoch (a resumed run starts mid-epoch): one step per accumulation window."""
    progress = run.progress
    run.sampler.set_epoch(progress.epoch, progress.batches_in_epoch)
    batches = hint_bad_samples(iter(run.loader), dashboard.bar)
    while progress.step < run.total_steps:
        window = [b for _, b in zip(range(run.accum), batches)]
        if not window:
            break
        _step(run, window, dashboard)
        stop = _save_or_stop(run, clock)
        if stop is not None:
            return stop
    return None


def _step(run: _Stage, window: list[Collated], dashboard: Dashboard) -> None:
    """One optimizer step over an accumulation window, counted into the progress and recorded."""
    loss, tokens, n_samples = _accumulate(run.model, window, run.opts, run.problems)
    grad_norm = None
    if run.stage.max_grad_norm:
        grad_norm = float(run.accelerator.clip_grad_norm_(run.model.parameters(), run.stage.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress = run.progress
    progress.step += 1
    progress.batches_in_epoch += len(window) * run.world  # every process ran as many
    progress.tokens += tokens
    progress.skipped, progress.skipped_seen = dict(run.problems.counts), run.problems.seen_pairs()
    val_loss = None
    if run.validator and run.validator.due(progress.step, run.total_steps):
        val_loss = run.validator.loss(run.model, run.accelerator)
    dashboard.step(progress.step, progress.tokens, loss, run.scheduler.get_last_lr()[-1], grad_norm, n_samples,
                   val_loss)


def _save_or_stop(run: _Stage, clock: SaveClock) -> _Stop | None:
    """A resume checkpoint when one is due; a `_Stop` when the stage is to stop here (there is a later step)."""
    step, total_steps = run.progress.step, run.total_steps
    save, stop_signal = clock.due(step, partial(_reduce_sum, run.accelerator))
    if save and step < total_steps:
        save_resume_point(run.accelerator, run.model, run.optimizer, run.scheduler, run.stage, run.progress,
                          run.run_fingerprint)
        clock.saved()
    at_stop = run.stage.stop_after_steps is not None and step >= run.stage.stop_after_steps
    return _Stop(stop_signal) if (at_stop or stop_signal) and step < total_steps else None


@contextmanager
def tf32_matmuls(enabled: bool, cuda: bool) -> Iterator[None]:
    """On CUDA, float32 matmuls and convolutions in TF32 (LLaVA's --tf32 True) or in full precision, for
    the stage only: these are torch's process-wide switches, so they are restored afterwards and code run
    after the stage in the same process (evaluation, parity checks) keeps its own. Off CUDA: nothing."""
    if not cuda:
        yield
        return
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@dataclass(frozen=True)
class _RunOptions:
    accelerator: Accelerator
    loss_scale: float  # undoes the engine's averaging of gradients (distributed.loss_scale)
    loss_chunk_size: int | None
    flatten: bool  # packed rows as one row (flash-attn varlen)


def _accumulate(model: torch.nn.Module, window: list[Collated], opts: _RunOptions,
                problems: Problems) -> tuple[float, int, int]:
    """Forward/backward over one accumulation window (this process's part of it); returns the global
    batch's mean loss per supervised token, and the tokens attended (text + image, no padding) and the
    samples trained on, over all processes."""
    accelerator = opts.accelerator
    device = accelerator.device
    live = [c.batch for c in window if c.batch is not None]
    counts = torch.tensor([sum(b.supervised_tokens() for b in live), sum(b.num_tokens for b in live),
                           sum(len(b.ids) for b in live)], device=device)
    n_tokens, attended, n_samples = (int(x) for x in accelerator.reduce(counts, "sum"))  # same on every process
    total = torch.zeros((), dtype=torch.float64, device=device)
    for c in window:
        for s in c.skipped:
            problems.add(s.reason, s.message)
    for i, b in enumerate(live):
        if opts.flatten:
            b = flatten_rows(b)
        # Only the last micro-batch of a window needs to synchronise gradients across processes.
        sync = nullcontext() if i == len(live) - 1 else accelerator.no_sync(model)
        set_window_end(accelerator, i == len(live) - 1)
        with sync, accelerator.autocast():
            # No KV cache in training; transformers also only reads packed position ids without one.
            extra: dict[str, Any] = {"use_cache": False}
            if opts.loss_chunk_size is not None:
                extra["loss_chunk_size"] = opts.loss_chunk_size
            loss = model(**b.to(device).model_inputs(), num_items_in_batch=max(n_tokens, 1), **extra).loss
            # Only the loss is kept: the output's logits ([B, T, vocab], 2 GB in bf16 at 16 x 2048 x 32K, plus
            # accelerate's float32 copy of them under bf16 on one GPU / DDP) are freed before backward, which
            # needs only what autograd saved.
            # A stage where nothing trains (every part frozen) has nothing to do here.
            if loss.requires_grad:
                accelerator.backward(loss * opts.loss_scale)
        total += loss.detach().double()
    return float(accelerator.reduce(total, "sum")), attended, n_samples


def _reduce_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor.to(accelerator.device), "sum").cpu()


def _stopped(name: str, out: Path, progress: Progress, signum: int | None) -> None:
    """End of an invocation stopped before its last step: by stop_after_steps (returns) or a signal (raises)."""
    where = f"saved {list_checkpoints(out)[-1]}; run the same command again to resume from step {progress.step}"
    if signum is None:
        log(f"[{name}] stopped after step {progress.step} (stop_after_steps); {where}")
        return None
    raise TrainingInterrupted(signum, f"[{name}] stopped by {signal.Signals(signum).name} at step {progress.step}: "
                                      f"{where}")
