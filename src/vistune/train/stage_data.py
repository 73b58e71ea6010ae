"""A stage's data around the loop: the shared precheck, the loader, the held-out set, bad-sample hints and
the end-of-stage report of what was left out or cut."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import vistune
from vistune.chat.encode import ChatEncoder
from vistune.config import ModelConfig, StageConfig
from vistune.data.batch import Collated, collate
from vistune.data.dataset import SupervisedDataset
from vistune.data.precheck import CountOnce, apply_outcomes, check_samples, default_workers, shared_outcomes
from vistune.data.records import Problems, Sample
from vistune.data.sampler import EpochBatchSampler, GroupedBatchSampler
from vistune.errors import DataError
from vistune.model.vlm import VisionLanguageModel
from vistune.train.console import log
from vistune.train.distributed import ShardedBatchSampler, loader_workers, process_state
from vistune.train.packing import PackedBatchSampler, collate_packed
from vistune.train.validation import Validator


def precheck_stage(stage: StageConfig, samples: list[Sample], encoder: ChatEncoder, model: VisionLanguageModel,
                   problems: Problems, truncated: CountOnce) -> tuple[list[Sample], list[int]]:
    """The precheck, run in a process pool by the first process of each machine and shared with the others
    through OUTPUT_DIR/.precheck.json (reused on resume while data and encoding settings are unchanged)."""
    state = process_state()
    workers = default_workers()  # one process checks for the whole machine, the others wait: all its CPUs
    data = Path(stage.data.path).stat()
    key = hashlib.sha256(json.dumps([
        str(Path(stage.data.path).resolve()), data.st_size, data.st_mtime_ns, stage.data.image_folder,
        [s.id for s in samples], stage.format, stage.system_prompt, encoder.max_length, encoder.num_image_tokens,
        encoder.tokenizer.name_or_path, len(encoder.tokenizer), repr(model.layout), stage.data.verify_images,
        vistune.__version__]).encode()).hexdigest()
    outcomes = shared_outcomes(
        partial(check_samples, samples, encoder, workers, layout=model.layout, verify_images=stage.data.verify_images),
        Path(stage.output_dir) / ".precheck.json", key, state.is_local_main_process, state.wait_for_everyone)
    return apply_outcomes(samples, outcomes, stage.data.on_bad_sample == "skip", problems, truncated,
                          stage.data.on_truncated == "drop")


def build_validator(name: str, stage: StageConfig, samples: list[Sample], encoder: ChatEncoder, processor: object,
                    model_cfg: ModelConfig, model: VisionLanguageModel, problems: Problems,
                    accelerator: Accelerator) -> Validator | None:
    """The held-out set's loss, or None without one. Its samples are checked like the training ones."""
    if not samples:
        return None
    skip = stage.data.on_bad_sample == "skip"
    lengths = None
    if stage.data.precheck:
        samples, lengths = apply_outcomes(samples, check_samples(samples, encoder, layout=model.layout), skip,
                                          problems)
    dataset = SupervisedDataset(samples, encoder, processor, model_cfg.vision.image_preprocess, skip, lengths,
                                layout=model.layout)
    log(f"[{name}] validation: {len(samples)} held-out samples, loss every {stage.val_every} steps")
    return Validator(dataset, stage.micro_batch_size, encoder.tokenizer.pad_token_id, accelerator.process_index,
                     accelerator.num_processes, stage.val_every, stage.loss_chunk_size)


def training_loader(stage: StageConfig, dataset: SupervisedDataset, pad_token_id: int, accelerator: Accelerator
                    ) -> tuple[DataLoader, ShardedBatchSampler]:
    """This process's loader of micro-batches (padded or packed), and its sampler (set per epoch)."""
    workers = loader_workers(stage.data.num_workers)
    epoch_batches: EpochBatchSampler
    if stage.data.packing:
        pack_length = stage.data.pack_length or stage.model_max_length
        epoch_batches = PackedBatchSampler(dataset.lengths(), pack_length, stage.micro_batch_size, stage.seed)
        collate_fn = partial(collate_packed, pad_token_id=pad_token_id, pack_length=pack_length)
    else:
        epoch_batches = GroupedBatchSampler(dataset.lengths(), stage.micro_batch_size, stage.seed,
                                            stage.data.group_by_modality_length)
        collate_fn = partial(collate, pad_token_id=pad_token_id)
    sampler = ShardedBatchSampler(epoch_batches, accelerator.process_index, accelerator.num_processes)
    # The loader draws its worker seed from its own generator, not the global one, so that starting
    # a new epoch iterator (as a resumed run does mid-epoch) leaves the global RNG stream untouched.
    # Persistent workers keep their start-up cost to the first epoch; pinned memory speeds host->GPU copies.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(stage.seed), persistent_workers=workers > 0,
                        pin_memory=accelerator.device.type == "cuda")
    return loader, sampler


def report_problems(name: str, problems: Problems, truncated: CountOnce, out: Path) -> None:
    """The end-of-stage summary, with skipped.json and truncated.json (every truncated sample listed)."""
    log(f"[{name}] {problems.summary()}")
    if problems.total:
        out.mkdir(parents=True, exist_ok=True)
        report = {"total": problems.total, "counts": problems.counts, "examples": problems.examples}
        (out / "skipped.json").write_text(json.dumps(report, indent=2))
    if truncated.total:
        log(f"[{name}] {truncated.total} samples lost some reply tokens to model_max_length and were kept (e.g. "
            f"{next(iter(truncated.examples.values()))[0]}); data.on_truncated=drop leaves them out; "
            f"list: {out / 'truncated.json'}")
        report = {"total": truncated.total, "counts": truncated.counts, "samples": list(truncated.seen)}
        (out / "truncated.json").write_text(json.dumps(report, indent=2))


def hint_bad_samples(batches: Iterator[Collated], bar: tqdm) -> Iterator[Collated]:
    """The loader's batches; a bad sample it meets ends the progress bar first (the error gets its own
    line) and its error says how to skip such samples or find them before training."""
    try:
        yield from batches
    except DataError as e:
        bar.close()
        raise DataError(f"{e} (set data.on_bad_sample=skip to drop such samples; data.verify_images=true finds "
                        "unreadable images before training)", e.reason) from None
