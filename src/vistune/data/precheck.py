"""Tokenize every sample before training: labels checked, exact lengths, no late surprises.

A sample whose labels cannot be built (LabelError) or whose replies are all cut off by
`model_max_length` would otherwise be found when the loader reaches it, possibly hours in. Checking
costs about 1-2 ms per conversation per core; with `data.num_workers` > 0 large sets are checked in
that many processes. The exact token counts also make length-grouped batching exact.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from tqdm.auto import tqdm

from vistune.chat.encode import ChatEncoder
from vistune.data.dataset import sample_image_tokens
from vistune.data.records import Problems, Sample
from vistune.errors import DataError
from vistune.model.tiling import ImageLayout

_CHUNK = 2048
_POOL_MIN = 4 * _CHUNK  # below this, starting processes costs more than it saves

Outcome = tuple[int, str | None, str]  # (signed length or 0, skip reason, message)


def _check_chunk(encoder: ChatEncoder, samples: list[Sample], layout: ImageLayout | None = None) -> list[Outcome]:
    out: list[Outcome] = []
    for s in samples:
        try:
            enc = encoder.encode(list(s.messages), s.id, image_tokens=sample_image_tokens(layout, s))
        except DataError as e:
            out.append((0, e.reason, str(e)))
            continue
        if enc.n_supervised == 0:
            out.append((0, "all reply tokens truncated",
                        f"sample {s.id}: no reply token fits in model_max_length={encoder.max_length}"))
            continue
        out.append((len(enc.input_ids) * (1 if s.images else -1), None, ""))
    return out


def precheck(samples: list[Sample], encoder: ChatEncoder, skip_bad: bool, problems: Problems,
             workers: int = 0, pool_min: int = _POOL_MIN, layout: ImageLayout | None = None
             ) -> tuple[list[Sample], list[int]]:
    """The samples that encode cleanly and their signed lengths (negative: text-only). With an `hd`/`anyres`
    `layout`, each image's token count comes from its size (read from the file header).

    A LabelError stops the run naming the sample, unless skip_bad; fully truncated samples are
    always dropped and counted."""
    chunk = _CHUNK if len(samples) >= pool_min * 2 else max(1, pool_min // 4)
    chunks = [samples[i: i + chunk] for i in range(0, len(samples), chunk)]
    bar = tqdm(total=len(samples), desc="checking samples", unit="sample", leave=False)
    outcomes: list[Outcome] = []
    if workers > 0 and len(samples) >= pool_min:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for result in pool.map(_check_chunk, [encoder] * len(chunks), chunks, [layout] * len(chunks)):
                outcomes += result
                bar.update(len(result))
    else:
        for chunk in chunks:
            outcomes += _check_chunk(encoder, chunk, layout)
            bar.update(len(chunk))
    bar.close()

    kept, lengths = [], []
    for sample, (length, reason, message) in zip(samples, outcomes):
        if reason is None:
            kept.append(sample)
            lengths.append(length)
        elif reason == "all reply tokens truncated" or skip_bad:
            problems.add(reason, message)
        else:
            raise DataError(f"{message} (set data.on_bad_sample=skip to drop such samples)", reason)
    if not kept:
        raise DataError(f"no sample survived the check: {problems.summary()}")
    return kept, lengths
