"""Tokenize every sample before training: labels checked, exact lengths, no late surprises.

A sample whose labels cannot be built (LabelError) or whose replies are all cut off by
`model_max_length` would otherwise be found when the loader reaches it, possibly hours in. Checking
costs about 1-2 ms per conversation per core, so large sets are checked in a pool of processes (one per
CPU), once per machine: the other processes read the result
(`shared_outcomes`). The exact token counts also make length-grouped batching exact. Samples that lose
only some reply tokens to truncation are counted (and dropped if asked); with `verify_images` every
image is decoded once here, so a corrupt file is found (and counted once) before training.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vistune.chat.encode import ChatEncoder
from vistune.data.dataset import sample_image_tokens
from vistune.data.records import Problems, Sample
from vistune.errors import DataError
from vistune.files import write_text
from vistune.images import load_image
from vistune.model.tiling import ImageLayout

_CHUNK = 2048
_POOL_MIN = 4 * _CHUNK  # below this, starting processes costs more than it saves

Outcome = tuple[int, str | None, str, int]  # (signed length or 0, skip reason, message, reply tokens cut)
TRUNCATED = "some reply tokens truncated"


def _check_chunk(encoder: ChatEncoder, samples: list[Sample], layout: ImageLayout | None = None,
                 verify_images: bool = False) -> list[Outcome]:
    out: list[Outcome] = []
    for s in samples:
        try:
            enc = encoder.encode(list(s.messages), s.id, image_tokens=sample_image_tokens(layout, s))
            if verify_images:
                for path in s.images[: enc.n_images]:
                    load_image(path, s.id)  # a full decode: truncated or corrupt files fail here
        except DataError as e:
            out.append((0, e.reason, str(e), 0))
            continue
        if enc.n_supervised == 0:
            out.append((0, "all reply tokens truncated",
                        f"sample {s.id}: no reply token fits in model_max_length={encoder.max_length}", 0))
            continue
        message = (f"sample {s.id}: {enc.supervised_cut} of {enc.n_supervised + enc.supervised_cut} reply tokens "
                   f"cut by model_max_length={encoder.max_length}") if enc.supervised_cut else ""
        out.append((len(enc.input_ids) * (1 if s.images else -1), None, message, enc.supervised_cut))
    return out


def default_workers() -> int:
    """The CPUs this process may use (the precheck is CPU-bound: tokenizing and, with verify_images,
    decoding; it runs in one process per machine while the others wait)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_samples(samples: list[Sample], encoder: ChatEncoder, workers: int = 0, pool_min: int = _POOL_MIN,
                  layout: ImageLayout | None = None, verify_images: bool = False) -> list[Outcome]:
    """One outcome per sample, in order; in `workers` processes for large sets."""
    chunk = _CHUNK if len(samples) >= pool_min * 2 else max(1, pool_min // 4)
    chunks = [samples[i: i + chunk] for i in range(0, len(samples), chunk)]
    bar = tqdm(total=len(samples), desc="checking samples", unit="sample", leave=False)
    outcomes: list[Outcome] = []
    if workers > 1 and len(samples) >= pool_min:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            n = len(chunks)
            for result in pool.map(_check_chunk, [encoder] * n, chunks, [layout] * n, [verify_images] * n):
                outcomes += result
                bar.update(len(result))
    else:
        for chunk in chunks:
            outcomes += _check_chunk(encoder, chunk, layout, verify_images)
            bar.update(len(chunk))
    bar.close()
    return outcomes


def shared_outcomes(compute: Callable[[], list[Outcome]], cache: Path, key: str, local_main: bool,
                    barrier: Callable[[], None]) -> list[Outcome]:
    """Outcomes computed once per machine: the first process of each machine checks (or reuses `cache`
    when it was written under the same `key`, e.g. by the run being resumed) and writes the cache, the
    others wait and read it, rather than each of 8 processes checking 665K samples."""
    outcomes = None
    if local_main:
        if cache.is_file():
            stored = json.loads(cache.read_text())
            outcomes = [tuple(o) for o in stored["outcomes"]] if stored.get("key") == key else None
        if outcomes is None:
            outcomes = compute()
            write_text(cache, json.dumps({"key": key, "outcomes": outcomes}))  # a reader never sees half a file
    barrier()
    if outcomes is None:
        outcomes = [tuple(o) for o in json.loads(cache.read_text())["outcomes"]]
    return outcomes  # type: ignore[return-value]


def apply_outcomes(samples: list[Sample], outcomes: list[Outcome], skip_bad: bool, problems: Problems,
                   truncated: Problems | None = None, drop_truncated: bool = False) -> tuple[list[Sample], list[int]]:
    """The samples to train on and their signed lengths. A bad sample stops the run naming it, unless
    skip_bad; fully truncated samples are always dropped and counted; partly truncated ones are counted
    in `truncated` and kept, or dropped (and counted as skipped) with drop_truncated."""
    kept, lengths = [], []
    for sample, (length, reason, message, cut) in zip(samples, outcomes):
        if reason is None and cut and drop_truncated:
            problems.add(TRUNCATED, message)
        elif reason is None:
            if cut and truncated is not None:
                truncated.add(TRUNCATED, message)
            kept.append(sample)
            lengths.append(length)
        elif reason == "all reply tokens truncated" or skip_bad:
            problems.add(reason, message)
        else:
            raise DataError(f"{message} (set data.on_bad_sample=skip to drop such samples)", reason)
    if not kept:
        raise DataError(f"no sample survived the check: {problems.summary()}")
    return kept, lengths


def precheck(samples: list[Sample], encoder: ChatEncoder, skip_bad: bool, problems: Problems,
             workers: int = 0, pool_min: int = _POOL_MIN, layout: ImageLayout | None = None,
             verify_images: bool = False, truncated: Problems | None = None, drop_truncated: bool = False
             ) -> tuple[list[Sample], list[int]]:
    """The samples that encode cleanly and their signed lengths (negative: text-only). With an `hd`/`anyres`
    `layout`, each image's token count comes from its size (read from the file header); with verify_images
    every image is decoded. See `apply_outcomes` for what is dropped."""
    outcomes = check_samples(samples, encoder, workers, pool_min, layout, verify_images)
    return apply_outcomes(samples, outcomes, skip_bad, problems, truncated, drop_truncated)


@dataclass
class CountOnce(Problems):
    """Problems counting each record once: a bad image found by the loader in every epoch is one bad record.
    `seen`: message (it names the record) -> reason, of the records counted; kept in resume checkpoints."""

    seen: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        if message not in self.seen:
            self.seen[message] = reason
            super().add(reason, message)

    def restore(self, counts: dict[str, int], seen: list[list[str]]) -> None:
        """The counts and records of a resumed run (`Progress.skipped`, `Progress.skipped_seen`)."""
        self.counts.update(counts)
        for reason, message in seen:
            if message not in self.seen:
                self.seen[message] = reason
                examples = self.examples.setdefault(reason, [])
                if len(examples) < 3:
                    examples.append(message)

    def seen_pairs(self) -> list[list[str]]:
        return [[reason, message] for message, reason in self.seen.items()]
