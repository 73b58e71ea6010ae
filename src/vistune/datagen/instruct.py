"""The instruction-data pipeline: records x kinds -> teacher -> parse -> LLaVA JSONL, resumably.

Sample ids are `{record id}-{kind}`. Every sample ends in exactly one of the output file (valid) or
the rejects file beside it (with a reason); both are append-only (see `jsonl`), and a rerun of the
same command skips the ids found in either, so a killed run completes without loss or duplicates.
Only a file this command wrote (known by its sidecar, see `outputs`) is ever resumed into.
Delete the rejects file to try its samples again. Randomness (instruction drawn, image before or
after the question) comes from `(seed, sample id)`, so the result does not depend on the order in
which concurrent replies arrive, nor on where a run was interrupted.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

from vistune.datagen.jsonl import JsonlAppender, is_torn_line, rejects_path
from vistune.datagen.outputs import claim_output
from vistune.datagen.parse import KINDS, Rejected, parse_reply
from vistune.datagen.prompts import WITH_BOXES, load_instructions, load_kind, place_image
from vistune.datagen.sources import ImageRecord
from vistune.datagen.summary import Summary
from vistune.datagen.teachers import Reply, Request, Teacher, TeacherError
from vistune.errors import DataError


def sample_id(record: ImageRecord, kind: str) -> str:
    return f"{record.id}-{kind}"


def to_llava(sid: str, record: ImageRecord, kind: str, pairs: list[tuple[str, str]], detail_instructions: list[str],
             seed: int) -> dict[str, Any]:
    rng = random.Random(f"{seed}:{sid}:sample")
    if kind == "detail":
        pairs = [(rng.choice(detail_instructions), pairs[0][1])]
    conversations = []
    for i, (q, a) in enumerate(pairs):
        conversations.append({"from": "human", "value": place_image(q, rng) if i == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return {"id": sid, "image": record.image, "kind": kind, "conversations": conversations}


def _written_by_instruct(path: Path) -> bool:
    """True when every complete line is a sample of ours (`{record id}-{kind}` with its `kind`): an
    output or rejects file of a run from before the sidecar existed, which may still be resumed."""
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return is_torn_line(line)
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError:
                return False
            if not (isinstance(d, dict) and d.get("kind") in KINDS and str(d.get("id")).endswith(f"-{d['kind']}")):
                return False
    return True


def run_instruct(records: list[ImageRecord], kinds: list[str], teacher: Teacher, out: Path, *, seed: int = 0,
                 concurrency: int = 8, limit: int | None = None, progress: bool = True,
                 prompts_dir: Path | None = None, reask: int = 0) -> Summary:
    """Generate `kinds` for the first `limit` records into `out` (JSONL); rejects beside it.

    `reask`: ask the teacher again this many times when a reply fails validation (useful only with
    sampling, temperature > 0). Transport errors are retried inside the teacher."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DataError(f"unknown kind(s) {unknown}; valid: {', '.join(KINDS)}")
    records = records[:limit] if limit is not None else records
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DataError(f"record id {r.id!r} occurs twice in the input; ids must be unique (resume relies on them)")
        seen.add(r.id)
    prompts = {k: load_kind(k, prompts_dir) for k in kinds}
    detail_instructions = load_instructions("detail", prompts_dir)
    out = Path(out)
    if out.suffix == ".json":
        raise DataError(f"--out {out}: instruct appends JSONL (one record a line) and training reads a .json file as "
                        "one JSON list; give a .jsonl name")
    claim_output(out, "instruct", (rejects_path(out),), adopt=_written_by_instruct)
    summary = Summary()
    with JsonlAppender(out) as good, JsonlAppender(rejects_path(out)) as bad:
        done = good.ids | bad.ids
        todo = [(r, k) for r in records for k in kinds if sample_id(r, k) not in done]
        summary.skipped = len(records) * len(kinds) - len(todo)
        asyncio.run(_run(todo, prompts, detail_instructions, teacher, good, bad, summary, seed,
                         max(1, concurrency), progress, reask))
    if teacher.prices is not None:
        p_in, p_out = teacher.prices
        summary.cost = (summary.prompt_tokens * p_in + summary.completion_tokens * p_out) / 1e6
    return summary


async def _run(todo: list[tuple[ImageRecord, str]], prompts: dict, detail_instructions: list[str], teacher: Teacher,
               good: JsonlAppender, bad: JsonlAppender, summary: Summary, seed: int, concurrency: int,
               progress: bool, reask: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not progress, desc=f"datagen ({teacher.name})", unit="sample")

    async def one(record: ImageRecord, kind: str) -> None:
        sid = sample_id(record, kind)
        request = Request(sid, kind, prompts[kind].messages(record, WITH_BOXES[kind]), record, seed)
        reply: Reply | None = None
        reason = ""
        for _ in range(1 + reask):
            try:
                reply = await teacher.complete(request)
            except TeacherError as e:
                if e.unanswered:  # no reply at all: not done, a rerun asks again
                    summary.unfinished += 1
                    bar.update()
                    return
                reason = e.reason
                break
            summary.prompt_tokens += reply.prompt_tokens
            summary.completion_tokens += reply.completion_tokens
            summary.retries += reply.retries
            try:
                pairs = parse_reply(kind, reply.text, reply.finish_reason)
            except Rejected as e:
                reason = e.reason
                continue
            good.append(to_llava(sid, record, kind, pairs, detail_instructions, seed))
            summary.wrote(kind)
            bar.update()
            return
        bad.append({"id": sid, "image": record.image, "kind": kind, "reason": reason,
                    "reply": reply.text if reply else None})
        summary.reject(reason)
        bar.update()

    pending = iter(todo)

    async def worker() -> None:  # `concurrency` workers share one iterator: bounded in-flight requests
        for record, kind in pending:
            await one(record, kind)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)  # the first TeacherUnusable ends up here...
    finally:
        for task in tasks:  # ...and stops the other requests at once, before they record anything
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
