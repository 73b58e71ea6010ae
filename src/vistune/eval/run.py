"""The eval runner: tasks -> batched greedy generation through the engine -> scores and files.

For each task, under OUT/TASK/: `predictions.jsonl` (one {id, prompt, reply} per item, appended
batch by batch, so an interrupted run resumes where it stopped), `generation.json` (the model, by path and
fingerprint, and the settings that wrote them: a run with another model into the same OUT is refused
rather than credited with these replies), the server submission files, and OUT/metrics.json +
OUT/results.md for every task run into OUT so far.

Sharding: under torchrun (RANK / WORLD_SIZE set) each process takes every WORLD_SIZE-th item, on
cuda:LOCAL_RANK when there is a GPU, and writes `predictions.rank{R}-of-{W}.jsonl`; after a barrier
(torch.distributed, gloo) rank 0 merges the shards into `predictions.jsonl` in the task's order and
scores. Judges run on rank 0 only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from vistune.errors import DataError
from vistune.eval.tasks import Item, Task, get_task
from vistune.eval.tasks.base import write_text_atomic
from vistune.tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from vistune.eval.judge import Judge
    from vistune.infer.engine import Engine


def read_predictions(path: Path) -> dict[str, str]:
    """id -> reply from a predictions file; a torn last line (a crash mid-write) is skipped."""
    replies: dict[str, str] = {}
    if not path.is_file():
        return replies
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        replies[str(row["id"])] = row["reply"]
    return replies


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-write) so that appended records start on a line of their own."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        write_text_atomic(path, text[: text.rfind("\n") + 1])


def limit_items(task: Task, items: Sequence[Item], limit: int | None) -> list[Item]:
    """The first `limit` items of each of the task's batch groups, in order (all items when None).

    A task asked in several passes (the demo: every question with its image, then blind) lists one
    pass after the other; the first N of the whole list would hold only the first pass, and scores
    that compare the passes would have nothing to compare with."""
    if limit is None:
        return list(items)
    taken: dict[str | None, int] = {}
    kept = []
    for it in items:
        group = task.batch_group(it)
        if taken.get(group, 0) < limit:
            taken[group] = taken.get(group, 0) + 1
            kept.append(it)
    return kept


GENERATION_FILE = "generation.json"


def generation_record(engine: Engine | None, task: Task, max_new_tokens: int | None) -> dict[str, Any] | None:
    """What the replies in a task's folder depend on: the model (path + fingerprint) and the decoding
    settings. None for an engine built in memory (nothing to tell models apart by)."""
    identity = getattr(engine, "identity", None)
    if identity is None:
        return None
    return {**identity.as_dict(), "max_new_tokens": max_new_tokens or task.max_new_tokens, "temperature": 0.0}


def check_generation(folder: Path, record: dict[str, Any] | None, has_replies: bool, write: bool = True) -> None:
    """Refuse to add to or rescore replies written by another model or with other settings (they would be
    scored and reported as this model's); record who writes them otherwise."""
    path = folder / GENERATION_FILE
    if record is None:
        return
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored is None and has_replies:
        raise DataError(f"{folder} holds replies with no record of the model that wrote them ({GENERATION_FILE}); "
                        "give another --out, or delete the folder to generate them with this model")
    if stored is not None and stored != record:
        diff = ", ".join(f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in record.items() if stored.get(k) != v)
        raise DataError(f"{folder} holds replies of another model or other settings ({diff}); give another --out "
                        "for this model, or delete the folder to replace them")
    if stored is None and write:
        write_text_atomic(path, json.dumps(record, indent=1))


def recorded_model(folder: Path) -> str | None:
    """The model that wrote a task folder's replies, as its generation record names it."""
    path = folder / GENERATION_FILE
    return json.loads(path.read_text()).get("model") if path.is_file() else None


def _batches(task: Task, items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Consecutive chunks of at most batch_size items, never mixing the task's batch groups."""
    out: list[list[Item]] = []
    for it in items:
        if out and len(out[-1]) < batch_size and task.batch_group(out[-1][-1]) == task.batch_group(it):
            out[-1].append(it)
        else:
            out.append([it])
    return out


def generate_replies(engine: Engine, task: Task, items: Sequence[Item], batch_size: int = 8,
                     max_new_tokens: int | None = None, on_batch: Callable[[list[Item], list[str]], None] | None = None,
                     desc: str | None = None) -> list[str]:
    """Greedy replies for `items`, in order, batch by batch (left-padded by the engine)."""
    from vistune.infer.engine import Sampling

    sampling = Sampling(max_new_tokens=max_new_tokens or task.max_new_tokens)
    replies: list[str] = []
    processor = engine.bundle.image_processor
    for chunk in tqdm(_batches(task, items, batch_size), desc=desc or task.name, leave=False):
        convs = [[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n" * len(it.images) + it.prompt}] for it in chunk]
        out = engine.generate(convs, [task.images(it, processor) for it in chunk], sampling)
        if on_batch is not None:
            on_batch(chunk, out)
        replies += out
    return replies


def task_root(data: Path, task: Task) -> Path:
    """data/<the task's folder> or data/<task key> when present, else data itself (a single task's folder)."""
    for sub in (task.folder, task.name):
        if sub and (data / sub).is_dir():
            return data / sub
    return data


def _format(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and abs(value) <= 1.0 else \
        f"{value:.2f}" if isinstance(value, float) else str(value)


def results_table(metrics: dict[str, dict]) -> str:
    """Markdown: one row per task and headline metric."""
    lines = ["| task | metric | value | items |", "|---|---|---|---|"]
    for name, m in metrics.items():
        headline = m.get("headline") or []
        for key in headline:
            if key in m:
                lines.append(f"| {name} | {key} | {_format(m[key])} | {m.get('n', '')} |")
        if not any(k in m for k in headline):
            lines.append(f"| {name} | - | {m.get('note', 'not scored')} | {m.get('n', '')} |")
    return "\n".join(lines) + "\n"


class _Dist:
    """Rank, world size and a barrier: torch.distributed under torchrun, trivial otherwise."""

    def __init__(self, rank: int | None, world_size: int | None) -> None:
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.torch = rank is None and world_size is None and self.world > 1
        if self.torch:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")  # CPU-capable; only barriers go through it

    def barrier(self) -> None:
        if self.torch:
            import torch.distributed as dist

            dist.barrier()


def evaluate_task(task: Task, engine: Engine | None, data: Path, out: Path, batch_size: int = 8,
                  max_new_tokens: int | None = None, limit: int | None = None, judge: Judge | None = None,
                  rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> dict | None:
    """Generate what is missing for this shard, then (rank 0) merge, score and write files; returns metrics on rank 0."""
    items = limit_items(task, task.load(task_root(data, task)), limit)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{task.name}: item ids repeat in {task_root(data, task)}; ids key the predictions file")
    folder = out / task.name
    folder.mkdir(parents=True, exist_ok=True)
    merged = folder / "predictions.jsonl"
    if task.answers is not None and rank == 0:  # rescoring an answer file in LLaVA's layout (eval/answers.py)
        from vistune.eval.answers import import_answers

        import_answers(task, items, merged)
    shard = merged if world_size == 1 else folder / f"predictions.rank{rank}-of-{world_size}.jsonl"
    done = {**read_predictions(merged), **read_predictions(shard)}
    if engine is not None:  # every rank refuses alike; rank 0 writes the record
        check_generation(folder, generation_record(engine, task, max_new_tokens), bool(done), write=rank == 0)
    todo = [it for it in items[rank::world_size] if it.id not in done]
    if todo:
        if engine is None:
            raise DataError(f"{task.name}: {len(todo)} item(s) have no prediction in {folder} and no model was given")
        drop_torn_tail(shard)
        with shard.open("a", encoding="utf-8") as f:
            def append(chunk: list[Item], replies: list[str]) -> None:
                for it, reply in zip(chunk, replies):
                    f.write(json.dumps({"id": it.id, "prompt": it.prompt, "reply": reply}, ensure_ascii=False) + "\n")
                f.flush()
            generate_replies(engine, task, todo, batch_size, max_new_tokens, append,
                             desc=f"{task.name} (rank {rank}/{world_size})" if world_size > 1 else task.name)
    barrier()
    if rank != 0:
        barrier()
        return None
    replies = read_predictions(merged)
    shards = sorted(folder.glob("predictions.rank*-of-*.jsonl"))
    for path in shards:
        replies.update(read_predictions(path))
    lost = [i for i in ids if i not in replies]
    if lost:
        raise DataError(f"{task.name}: {len(lost)} item(s) have no prediction after merging (first: {lost[0]}); "
                        "run again to fill them in")
    prompts = {it.id: it.prompt for it in items}
    write_text_atomic(merged, "".join(json.dumps({"id": i, "prompt": prompts[i], "reply": replies[i]}, ensure_ascii=False)
                                  + "\n" for i in ids))
    for path in shards:
        path.unlink()
    metrics = task.score(items, replies, judge)
    metrics["headline"] = list(task.headline)
    metrics["submission_files"] = [str(p) for p in task.write_submission(items, replies, folder)]
    barrier()
    return metrics


def run_eval(tasks: Sequence[str], model: Path | None, data: Path, out: Path, batch_size: int = 8,
             max_new_tokens: int | None = None, limit: int | None = None, judge: Judge | None = None,
             task_options: dict[str, dict[str, Any]] | None = None, device: str | None = None,
             engine: Engine | None = None, parts: dict[str, Path | None] | None = None) -> dict[str, dict]:
    """Run `tasks` and write OUT/metrics.json and OUT/results.md; returns this run's metrics (rank 0).
    `parts`: vision/llm/base folders for original-LLaVA models (see `vistune.infer.load.load_model`)."""
    task_options = task_options or {}
    for name in task_options:
        if name not in tasks:
            raise DataError(f"options given for task {name!r}, which is not among the tasks run ({', '.join(tasks)})")
    built = [get_task(name, **task_options.get(name, {})) for name in tasks]
    dist = _Dist(None, None)
    if engine is None and model is not None:
        from vistune.infer.engine import Engine

        if device is None and dist.world > 1:
            import torch

            device = f"cuda:{os.environ.get('LOCAL_RANK', dist.rank)}" if torch.cuda.is_available() else "cpu"
        engine = Engine.load(model, device, **(parts or {}))
    results: dict[str, dict] = {}
    for task in built:
        m = evaluate_task(task, engine, data, out, batch_size, max_new_tokens, limit,
                          judge if dist.rank == 0 else None, dist.rank, dist.world, dist.barrier)
        if m is not None:
            results[task.name] = m
            all_metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
            all_metrics[task.name] = m | {"model": recorded_model(out / task.name) or (str(model) if model else None)}
            write_text_atomic(out / "metrics.json", json.dumps(all_metrics, indent=1, ensure_ascii=False))
            write_text_atomic(out / "results.md", results_table(all_metrics))
    return results
