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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import get_format
from vistune.config import ModelConfig, RunConfig, StageConfig, stage_image_preprocess
from vistune.data.batch import Collated, collate
from vistune.data.dataset import SupervisedDataset
from vistune.data.precheck import CountOnce
from vistune.data.records import Problems, load_samples
from vistune.data.rules import apply_rules
from vistune.data.sampler import GroupedBatchSampler
from vistune.errors import ConfigError
from vistune.model.checkpoint import SPEC_FILE, build_model, load_projector
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.train.parts import apply_parts, describe, param_groups
from vistune.train.distributed import (
    ShardedBatchSampler,
    compile_layers,
    loader_workers,
    loss_scale,
    make_accelerator,
    process_state,
    reset_engine,
    set_window_end,
    wrap_policy_for,
)
from vistune.train.packing import PackedBatchSampler, collate_packed, flatten_rows
from vistune.train.console import log
from vistune.train.validate import check_run
from vistune.train.engine_state import check_resumable, load_engine_resume
from vistune.train.provenance import data_identity, fingerprint, resume_checkpoints, write_run_files
from vistune.train.signals import SaveClock, StopRequests, TrainingInterrupted
from vistune.train.stage_data import build_validator, hint_bad_samples, precheck_stage, report_problems
from vistune.train.saving import save_final, save_resume_point
from vistune.train.state import Progress, list_checkpoints, load_resume
from vistune.train.tracking import Metrics, accelerator_kwargs
from vistune.train.validation import split_validation


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
    out = Path(stage.output_dir)
    if (out / SPEC_FILE).is_file():
        log(f"[{name}] {out} already holds a finished model; skipping (delete it or change output_dir to retrain)")
        return out
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
    accum = stage.global_batch_size // (stage.micro_batch_size * world)
    # Trained weights stay float32 (autocast computes in bf16); a frozen LLM is held in bf16 to halve
    # its memory. The vision tower stays float32: it is small next to the LLM, autocast runs it in
    # bf16 anyway, and a copy saved from it equals its source.
    llm_dtype = torch.bfloat16 if stage.precision == "bf16" and stage.parts.llm != "full" else torch.float32

    # Data first: a bad record must stop the run before minutes go into loading weights.
    problems, truncated = CountOnce(), CountOnce()
    samples = load_samples(stage.data.path, stage.data.image_folder, stage.data.on_bad_sample == "skip", problems)
    samples, val_samples = split_validation(stage, samples, problems)
    samples, val_samples = (apply_rules(part, stage.data.image_placement) for part in (samples, val_samples))
    accelerator = make_accelerator(stage.distributed, stage.precision, accum, stage.micro_batch_size,
                                   stage.max_grad_norm, **accelerator_kwargs(stage.report_to, out))
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # resumes through its own state
    run_fingerprint = fingerprint(model_cfg, stage, data_identity(stage.data.path, [s.id for s in samples]), world)
    checkpoints = resume_checkpoints(out, stage, name, run_fingerprint, allow_config_change, accelerator)

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

    encoder = ChatEncoder(tokenizer, get_format(stage.format, stage.system_prompt), model.num_image_tokens,
                          stage.model_max_length)
    lengths = None
    workers = loader_workers(stage.data.num_workers)
    if stage.data.precheck:
        samples, lengths = precheck_stage(stage, samples, encoder, model, problems, truncated)
    dataset = SupervisedDataset(samples, encoder, processor, stage_image_preprocess(model_cfg, stage),
                                stage.data.on_bad_sample == "skip", lengths, layout=model.layout)
    validator = build_validator(name, stage, val_samples, encoder, processor, model_cfg, model, problems, accelerator)
    if stage.data.packing:
        pack_length = stage.data.pack_length or stage.model_max_length
        epoch_batches = PackedBatchSampler(dataset.lengths(), pack_length, stage.micro_batch_size, stage.seed)
        collate_fn = partial(collate_packed, pad_token_id=tokenizer.pad_token_id, pack_length=pack_length)
    else:
        epoch_batches = GroupedBatchSampler(dataset.lengths(), stage.micro_batch_size, stage.seed,
                                            stage.data.group_by_modality_length)
        collate_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    sampler = ShardedBatchSampler(epoch_batches, accelerator.process_index, world)
    # The loader draws its worker seed from its own generator, not the global one, so that starting
    # a new epoch iterator (as a resumed run does mid-epoch) leaves the global RNG stream untouched.
    # Persistent workers keep their start-up cost to the first epoch; pinned memory speeds host->GPU copies.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(stage.seed), persistent_workers=workers > 0,
                        pin_memory=accelerator.device.type == "cuda")

    batches_per_epoch = len(sampler.batches(0))  # over all processes
    steps_per_epoch = math.ceil(batches_per_epoch / (accum * world))
    total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    # Fused AdamW (one kernel for all parameters) on CUDA; the weights are moved there by `prepare`.
    optimizer = torch.optim.AdamW(param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay),
                                  lr=stage.lr, betas=(0.9, 0.999), fused=accelerator.device.type == "cuda")
    scheduler = get_scheduler(stage.lr_schedule, optimizer, math.ceil(stage.warmup_ratio * total_steps), total_steps)
    wrap_policy_for(accelerator, model.llm)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_opts = _RunOptions(accelerator, loss_scale(accelerator, accum), stage.loss_chunk_size,
                           flatten=stage.data.packing and model_cfg.llm.attn_implementation == "flash_attention_2")

    progress = Progress()
    if checkpoints:
        check_resumable(checkpoints[-1], stage.distributed, deepspeed, world)
        progress = (load_engine_resume(accelerator, checkpoints[-1], scheduler) if deepspeed
                    else load_resume(checkpoints[-1], model, optimizer, scheduler))
        log(f"[{name}] resumed from {checkpoints[-1]} (step {progress.step}/{total_steps})")
    problems.restore(progress.skipped, progress.skipped_seen)
    log(f"[{name}] {len(dataset)} samples, {batches_per_epoch} batches of {stage.micro_batch_size} per epoch, "
        f"{accum} per step on each of {world} processes, {total_steps} steps")

    if accelerator.is_main_process:  # config.yaml (step-N folders are rebuilt from it) and versions.json
        write_run_files(out, model_cfg, stage, name)
    metrics = Metrics(out, accelerator, name, stage.model_dump(mode="json"), progress.step, progress.tokens,
                      stage.log_every)
    bar = tqdm(total=total_steps, initial=progress.step, desc=name, disable=not accelerator.is_main_process)
    model.train()
    stopped_early, stop_signal = False, None
    with StopRequests() as requests:  # SIGTERM/SIGUSR1/Ctrl-C: save at the next step boundary
        clock = SaveClock(stage.save_every, stage.save_every_minutes, stage.stop_after_steps, requests)
        postfix: dict[str, str] = {}
        while progress.step < total_steps:
            sampler.set_epoch(progress.epoch, progress.batches_in_epoch)
            batches = hint_bad_samples(iter(loader), bar)
            while progress.step < total_steps:
                window = [b for _, b in zip(range(accum), batches)]
                if not window:
                    break
                loss, tokens, n_samples = _accumulate(model, window, run_opts, problems)
                grad_norm = None
                if stage.max_grad_norm:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.batches_in_epoch += len(window) * world  # every process ran as many
                progress.tokens += tokens
                progress.skipped, progress.skipped_seen = dict(problems.counts), problems.seen_pairs()
                val_loss = None
                if validator and validator.due(progress.step, total_steps):
                    val_loss = validator.loss(model, accelerator)
                row = metrics.step(progress.step, progress.tokens, loss, scheduler.get_last_lr()[-1], grad_norm,
                                   n_samples, val_loss)
                bar.update(1)
                postfix.update(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                               **({"val_loss": f"{val_loss:.4f}"} if val_loss is not None else {}))
                bar.set_postfix(postfix)
                save, stop_signal = clock.due(progress.step, partial(_reduce_sum, accelerator))
                if save and progress.step < total_steps:
                    save_resume_point(accelerator, model, optimizer, scheduler, stage, progress, run_fingerprint)
                    clock.saved()
                at_stop = stage.stop_after_steps is not None and progress.step >= stage.stop_after_steps
                if (at_stop or stop_signal) and progress.step < total_steps:
                    stopped_early = True
                    break
            if stopped_early:
                break
            if progress.step < total_steps:
                progress.epoch += 1
                progress.batches_in_epoch = 0
    bar.close()
    metrics.close()
    report_problems(name, problems, truncated, out)
    if stopped_early:
        return _stopped(name, out, progress, stop_signal)

    return save_final(accelerator, model, model_cfg, stage, name, progress, tokenizer, processor)




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
