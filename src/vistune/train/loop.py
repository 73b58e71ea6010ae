"""The one training loop. A stage (align, finetune, ...) only changes what it is given.

Gradient accumulation weighs every supervised token equally: the loss of each micro-batch is summed
over its tokens and divided by the number of supervised tokens in the whole accumulation window
(transformers' `num_items_in_batch`), rather than averaging per-micro-batch means, which would
overweight short samples.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import vistune
from vistune.chat.encode import IGNORE_INDEX, ChatEncoder
from vistune.chat.formats import get_format
from vistune.config import ModelConfig, RunConfig, StageConfig, stage_image_preprocess
from vistune.data.dataset import SupervisedDataset, collate
from vistune.data.precheck import precheck
from vistune.data.records import Problems, load_samples
from vistune.data.rules import apply_rules
from vistune.data.sampler import GroupedBatchSampler
from vistune.errors import ConfigError
from vistune.model.checkpoint import SPEC_FILE, Bundle, ModelSpec, build_model, load_projector, save_checkpoint
from vistune.model.vlm import VisionLanguageModel
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.train.parts import apply_parts, describe, param_groups
from vistune.train.distributed import (
    ShardedBatchSampler,
    compile_layers,
    is_sharded,
    loader_workers,
    loss_scale,
    make_accelerator,
    process_state,
    reset_engine,
    set_window_end,
    wrap_policy_for,
)
from vistune.train.packing import PackedBatchSampler, collate_packed, flatten_rows
from vistune.train.validate import check_run
from vistune.train.engine_state import check_resumable, load_engine_resume, save_engine_resume
from vistune.train.state import Progress, gather_state, list_checkpoints, load_resume, save_resume


def log(msg: str) -> None:
    """Progress messages, from the first process only (once per run, not once per GPU)."""
    if PartialState._shared_state and not PartialState().is_main_process:
        return
    tqdm.write(msg)


def run(cfg: RunConfig, only: list[str] | None = None) -> dict[str, Path]:
    """Train the stages in order (or only those named); a stage whose output is complete is skipped."""
    state = process_state(cfg.collective_timeout_minutes)  # the processes join here, with the run's timeout
    # Every stage is checked before the first one starts: a stage-2 mistake must not wait for stage 1.
    check_run(cfg, state.num_processes, only)
    outputs = {}
    for name, stage in cfg.stages.items():
        if only and name not in only:
            continue
        done = train_stage(cfg.model, stage, name)
        if done is None:  # stopped early (stop_after_steps): later stages need this one finished
            break
        outputs[name] = done
    return outputs


def train_stage(model_cfg: ModelConfig, stage: StageConfig, name: str = "stage") -> Path | None:
    """Train one stage; returns its output folder, or None when it stopped early to be resumed."""
    with tf32_matmuls(stage.tf32, torch.cuda.is_available()):
        return _train_stage(model_cfg, stage, name)


def _train_stage(model_cfg: ModelConfig, stage: StageConfig, name: str) -> Path | None:
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
    problems = Problems()
    samples = load_samples(stage.data.path, stage.data.image_folder, stage.data.on_bad_sample == "skip", problems)
    samples = apply_rules(samples, stage.data.image_placement)
    accelerator = make_accelerator(stage.distributed, stage.precision, accum, stage.micro_batch_size,
                                   stage.max_grad_norm)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # resumes through its own state

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
        samples, lengths = precheck(samples, encoder, stage.data.on_bad_sample == "skip", problems,
                                    workers, layout=model.layout)
    dataset = SupervisedDataset(samples, encoder, processor, stage_image_preprocess(model_cfg, stage),
                                stage.data.on_bad_sample == "skip", lengths, layout=model.layout)
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
    checkpoints = list_checkpoints(out) if stage.resume else []
    if checkpoints:
        check_resumable(checkpoints[-1], stage.distributed, deepspeed, world)
        progress = (load_engine_resume(accelerator, checkpoints[-1], scheduler) if deepspeed
                    else load_resume(checkpoints[-1], model, optimizer, scheduler))
        log(f"[{name}] resumed from {checkpoints[-1]} (step {progress.step}/{total_steps})")
    problems.counts.update(progress.skipped)
    log(f"[{name}] {len(dataset)} samples, {batches_per_epoch} batches of {stage.micro_batch_size} per epoch, "
        f"{accum} per step on each of {world} processes, {total_steps} steps")

    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:  # step-N folders are rebuilt from it (vistune.train.step_model)
        from vistune.train.step_model import write_stage_file

        write_stage_file(out, model_cfg, stage, name)
    metrics = _Metrics(out, stage, progress, accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=progress.step, desc=name, disable=not accelerator.is_main_process)
    model.train()
    stopped_early = False
    while progress.step < total_steps:
        sampler.set_epoch(progress.epoch, progress.batches_in_epoch)
        batches = iter(loader)
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
            progress.skipped = dict(problems.counts)
            row = metrics.step(progress, loss, scheduler.get_last_lr()[-1], grad_norm, n_samples)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            at_stop = stage.stop_after_steps is not None and progress.step >= stage.stop_after_steps
            if ((stage.save_every and progress.step % stage.save_every == 0) or at_stop) and progress.step < total_steps:
                if deepspeed:  # every process writes its partition
                    save_engine_resume(accelerator, out, stage.distributed, scheduler, progress, stage.keep_checkpoints)
                else:
                    state = gather_state(model, optimizer)  # on every process: FSDP gathers shards
                    if accelerator.is_main_process:
                        save_resume(out, state, scheduler, progress, stage.keep_checkpoints)
                    accelerator.wait_for_everyone()
            if at_stop and progress.step < total_steps:
                stopped_early = True
                break
        if stopped_early:
            break
        if progress.step < total_steps:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    metrics.close()
    _report(name, problems, out)
    if stopped_early:
        log(f"[{name}] stopped after step {progress.step} (stop_after_steps); run the same command again to resume")
        return None

    unwrapped = accelerator.unwrap_model(model)
    spec = _final_spec(model_cfg, stage, name, unwrapped, progress)
    if is_sharded(accelerator, unwrapped):
        # FSDP / ZeRO-3: the folder is written from the gathered full weights, on the main process.
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            full = accelerator.get_state_dict(model)  # ZeRO-3's 16-bit gather (rank 0)
        else:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return out
        unwrapped = _unsharded_copy(model_cfg, stage, unwrapped, full)
    if accelerator.is_main_process and stage.parts.llm == "full" and stage.precision == "bf16":
        # A trained LLM is saved in the training dtype, as LLaVA does: half the bytes and the write time of its
        # float32 master weights (13 GB instead of 27 GB at 7B). Training is over; nothing reads them after.
        unwrapped.llm.to(torch.bfloat16)
    if accelerator.is_main_process:
        bundle = Bundle(unwrapped, tokenizer, processor, spec)
        save_checkpoint(out, bundle, spec.vision, model_cfg.llm, stage.parts.llm, stage.save_frozen)
        log(f"[{name}] saved {out}")
    accelerator.wait_for_everyone()
    return out


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


def _accumulate(model: torch.nn.Module, window: list[dict], opts: _RunOptions,
                problems: Problems) -> tuple[float, int, int]:
    """Forward/backward over one accumulation window (this process's part of it); returns the global
    batch's mean loss per supervised token, and the tokens attended (text + image, no padding) and the
    samples trained on, over all processes."""
    accelerator = opts.accelerator
    device = accelerator.device
    live = [b for b in window if "input_ids" in b]
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in live),
                           sum(_attended(b) for b in live), sum(len(b["ids"]) for b in live)], device=device)
    n_tokens, attended, n_samples = (int(x) for x in accelerator.reduce(counts, "sum"))  # same on every process
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in window:
        for s in b["skipped"]:
            problems.add(s.reason, s.message)
    for i, b in enumerate(live):
        if opts.flatten:
            b = flatten_rows(b)
        # Only the last micro-batch of a window needs to synchronise gradients across processes.
        sync = nullcontext() if i == len(live) - 1 else accelerator.no_sync(model)
        set_window_end(accelerator, i == len(live) - 1)
        with sync, accelerator.autocast():
            # No KV cache in training; transformers also only reads packed position ids without one.
            extra = {"use_cache": False}
            if b.get("position_ids") is not None:
                extra["position_ids"] = b["position_ids"].to(device)
            for key, value in b.get("flash_kwargs", {}).items():  # packed rows' boundaries (flatten_rows)
                extra[key] = value.to(device) if isinstance(value, torch.Tensor) else value
            if opts.loss_chunk_size is not None:
                extra["loss_chunk_size"] = opts.loss_chunk_size
            loss = model(
                input_ids=b["input_ids"].to(device),
                attention_mask=None if b["attention_mask"] is None else b["attention_mask"].to(device),
                pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                labels=b["labels"].to(device), num_items_in_batch=max(n_tokens, 1),
                image_sizes=b.get("image_sizes"), **extra,
            ).loss
            # Only the loss is kept: the output's logits ([B, T, vocab], 2 GB in bf16 at 16 x 2048 x 32K, plus
            # accelerate's float32 copy of them under bf16 on one GPU / DDP) are freed before backward, which
            # needs only what autograd saved.
            # A stage where nothing trains (every part frozen) has nothing to do here.
            if loss.requires_grad:
                accelerator.backward(loss * opts.loss_scale)
        total += loss.detach().double()
    return float(accelerator.reduce(total, "sum")), attended, n_samples


def _attended(batch: dict) -> int:
    if batch.get("num_tokens") is not None:  # packed
        return int(batch["num_tokens"])
    return int(batch["attention_mask"].sum())


def _unsharded_copy(model_cfg: ModelConfig, stage: StageConfig, sharded: VisionLanguageModel,
                    full: dict[str, torch.Tensor]) -> VisionLanguageModel:
    """A plain model holding FSDP's gathered weights, for `save_checkpoint` (main process)."""
    llm_dtype = next(p.dtype for p in sharded.llm.parameters())
    if stage.precision == "bf16":  # built in the dtype it is saved in: half the host memory of float32
        llm_dtype = torch.bfloat16
    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, torch.float32, llm_dtype)
    apply_parts(model, stage.parts, stage.lora, False)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if not k.startswith("vision.")]:
        raise RuntimeError(f"gathered FSDP weights do not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


class _Metrics:
    """Per-step numbers to metrics.jsonl and TensorBoard (main process only), and tokens/s."""

    def __init__(self, out: Path, stage: StageConfig, progress: Progress, main_process: bool) -> None:
        self.path = out / "metrics.jsonl"
        self.every = stage.log_every
        self.main = main_process
        self.writer = None
        if main_process:
            # On resume, drop rows logged after the checkpoint: those steps are trained (and logged) again.
            if self.path.is_file():
                rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= progress.step]
                self.path.write_text("".join(r + "\n" for r in rows))
            if stage.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.t_last, self.tokens_last = time.perf_counter(), progress.tokens

    def step(self, progress: Progress, loss: float, lr: float, grad_norm: float | None, samples: int) -> dict:
        now = time.perf_counter()
        step_s = max(now - self.t_last, 1e-9)
        tok_s = (progress.tokens - self.tokens_last) / step_s
        self.t_last, self.tokens_last = now, progress.tokens
        row = {"step": progress.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "grad_norm": grad_norm,
               "samples": samples, "step_s": step_s}
        if self.main and progress.step % self.every == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.writer:
                for key, value in row.items():
                    if key != "step" and value is not None:
                        self.writer.add_scalar(f"train/{key}", value, progress.step)
        return row

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _final_spec(model_cfg: ModelConfig, stage: StageConfig, name: str, model: VisionLanguageModel,
                progress: Progress) -> ModelSpec:
    # The saved model records the preprocessing its (last) stage trained with: inference must match it.
    vision = model_cfg.vision.model_copy(update={"image_preprocess": stage_image_preprocess(model_cfg, stage)})
    return ModelSpec(
        vision=vision, llm=model_cfg.llm, projector=model_cfg.projector,
        vision_hidden_size=model.vision.hidden_size,
        llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
        num_image_tokens=model.num_image_tokens, conversation_format=stage.format,
        system_prompt=stage.system_prompt, model_max_length=stage.model_max_length,
        provenance={"stage": name, "steps": progress.step, "tokens": progress.tokens, "vistune": vistune.__version__,
                    "torch": torch.__version__, "parts": stage.parts.model_dump(),
                    "hyperparameters": stage.model_dump(exclude={"data", "parts"})},
    )


def _report(name: str, problems: Problems, out: Path) -> None:
    log(f"[{name}] {problems.summary()}")
    if problems.total:
        out.mkdir(parents=True, exist_ok=True)
        report = {"total": problems.total, "counts": problems.counts, "examples": problems.examples}
        (out / "skipped.json").write_text(json.dumps(report, indent=2))
