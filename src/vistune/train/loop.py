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
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import vistune
from vistune.chat.encode import IGNORE_INDEX, ChatEncoder
from vistune.chat.formats import get_format
from vistune.config import ModelConfig, RunConfig, StageConfig
from vistune.data.dataset import SupervisedDataset, collate
from vistune.data.precheck import precheck
from vistune.data.records import Problems, load_samples
from vistune.data.sampler import GroupedBatchSampler
from vistune.errors import ConfigError
from vistune.model.checkpoint import SPEC_FILE, Bundle, ModelSpec, build_model, load_projector, save_checkpoint
from vistune.model.vlm import VisionLanguageModel
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.train.parts import apply_parts, describe, param_groups
from vistune.train.state import Progress, list_checkpoints, load_resume, save_resume


def log(msg: str) -> None:
    tqdm.write(msg)


def run(cfg: RunConfig, only: list[str] | None = None) -> dict[str, Path]:
    """Train the stages in order (or only those named); a stage whose output is complete is skipped."""
    unknown = [n for n in only or [] if n not in cfg.stages]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; this config has: {', '.join(cfg.stages)}")
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
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16" if stage.precision == "bf16" else "no")
    if accelerator.num_processes > 1:
        # Sharding the batches and reducing the token count across processes is not wired in yet;
        # running anyway would silently train every process on the same batches.
        raise ConfigError(f"{accelerator.num_processes} processes were launched, but this version of vistune "
                          "trains on one process (one GPU); launch it without torchrun/accelerate")
    # Trained weights stay float32 (autocast computes in bf16); a frozen LLM is held in bf16 to halve
    # its memory. The vision tower stays float32: it is small next to the LLM, autocast runs it in
    # bf16 anyway, and a copy saved from it equals its source.
    llm_dtype = torch.bfloat16 if stage.precision == "bf16" and stage.parts.llm != "full" else torch.float32

    # Data first: a bad record must stop the run before minutes go into loading weights.
    problems = Problems()
    samples = load_samples(stage.data.path, stage.data.image_folder, stage.data.on_bad_sample == "skip", problems)

    model = build_model(model_cfg.vision, model_cfg.llm, model_cfg.projector, torch.float32, llm_dtype)
    tokenizer = load_tokenizer(model_cfg.llm.path, model_cfg.llm.gguf_file)
    processor = load_image_processor(model_cfg.vision.path)
    if stage.projector_from:
        load_projector(model, stage.projector_from, model_cfg.projector)
        log(f"[{name}] projector loaded from {stage.projector_from}")
    apply_parts(model, stage.parts, stage.lora, stage.gradient_checkpointing)
    log(f"[{name}] what trains:\n{describe(model)}")

    encoder = ChatEncoder(tokenizer, get_format(stage.format, stage.system_prompt), model.num_image_tokens,
                          stage.model_max_length)
    lengths = None
    if stage.data.precheck:
        samples, lengths = precheck(samples, encoder, stage.data.on_bad_sample == "skip", problems,
                                    stage.data.num_workers, layout=model.layout)
    dataset = SupervisedDataset(samples, encoder, processor, model_cfg.vision.image_preprocess,
                                stage.data.on_bad_sample == "skip", lengths, layout=model.layout)
    sampler = GroupedBatchSampler(dataset.lengths(), stage.micro_batch_size, stage.seed,
                                  stage.data.group_by_modality_length)
    # The loader draws its worker seed from its own generator, not the global one, so that starting
    # a new epoch iterator (as a resumed run does mid-epoch) leaves the global RNG stream untouched.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=stage.data.num_workers,
                        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(stage.seed))

    accum = stage.global_batch_size // (stage.micro_batch_size * accelerator.num_processes)
    batches_per_epoch = len(sampler.batches(0))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, stage.lr, stage.projector_lr, stage.weight_decay),
                                  lr=stage.lr, betas=(0.9, 0.999))
    scheduler = get_scheduler(stage.lr_schedule, optimizer, math.ceil(stage.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    progress = Progress()
    checkpoints = list_checkpoints(out) if stage.resume else []
    if checkpoints:
        progress = load_resume(checkpoints[-1], accelerator.unwrap_model(model), optimizer, scheduler)
        log(f"[{name}] resumed from {checkpoints[-1]} (step {progress.step}/{total_steps})")
    problems.counts.update(progress.skipped)
    log(f"[{name}] {len(dataset)} samples, {batches_per_epoch} batches of {stage.micro_batch_size} per epoch, "
        f"{accum} per step, {total_steps} steps")

    out.mkdir(parents=True, exist_ok=True)
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
            loss = _accumulate(model, window, accelerator, problems)
            grad_norm = None
            if stage.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batches_in_epoch += len(window)
            progress.tokens += sum(int(b["attention_mask"].sum()) for b in window if "attention_mask" in b)
            progress.skipped = dict(problems.counts)
            row = metrics.step(progress, loss, scheduler.get_last_lr()[-1], grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            at_stop = stage.stop_after_steps is not None and progress.step >= stage.stop_after_steps
            if accelerator.is_main_process and (
                (stage.save_every and progress.step % stage.save_every == 0) or at_stop
            ) and progress.step < total_steps:
                save_resume(out, accelerator.unwrap_model(model), optimizer, scheduler, progress,
                            stage.keep_checkpoints)
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
    if accelerator.is_main_process:
        bundle = Bundle(unwrapped, tokenizer, processor, spec)
        save_checkpoint(out, bundle, model_cfg.vision, model_cfg.llm, stage.parts.llm, stage.save_frozen)
        log(f"[{name}] saved {out}")
    accelerator.wait_for_everyone()
    return out


def _accumulate(model: torch.nn.Module, window: list[dict], accelerator: Accelerator, problems: Problems) -> float:
    """Forward/backward over one accumulation window; returns the window's mean loss per token."""
    device = accelerator.device
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window if "labels" in b)
    total = 0.0
    live = [b for b in window if "input_ids" in b]
    for b in window:
        for s in b["skipped"]:
            problems.add(s.reason, s.message)
    for i, b in enumerate(live):
        # Only the last micro-batch of a window needs to synchronise gradients across processes.
        sync = nullcontext() if i == len(live) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            out = model(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(device),
                labels=b["labels"].to(device), num_items_in_batch=max(n_tokens, 1),
                image_sizes=b.get("image_sizes"),
            )
            # A text-only micro-batch with a frozen LLM (align) reaches no trainable weight: nothing to do.
            if out.loss.requires_grad:
                accelerator.backward(out.loss)
        total += float(out.loss.detach())
    return total


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

    def step(self, progress: Progress, loss: float, lr: float, grad_norm: float | None) -> dict:
        now = time.perf_counter()
        tok_s = (progress.tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, progress.tokens
        row = {"step": progress.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s, "grad_norm": grad_norm}
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
    return ModelSpec(
        vision=model_cfg.vision, llm=model_cfg.llm, projector=model_cfg.projector,
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
