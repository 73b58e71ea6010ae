"""`vistune eval`: run benchmarks on a model and score them as their official tools do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from tyro.conf import Positional, arg

from vistune.cli_options import Device, Parts
from vistune.errors import VistuneError


def eval_tasks(tasks: Annotated[str | None, Positional, arg(metavar="TASKS")] = None, *, data: Path, out: Path,
               model: Path | None = None, parts: Parts = Parts(),
               tasks_option: Annotated[str | None, arg(name="tasks", metavar="TASKS")] = None, batch_size: int = 8,
               max_new_tokens: int | None = None, limit: int | None = None, judge: str | None = None,
               judge_base_url: str | None = None, judge_retries: int = 6, option: tuple[str, ...] = (),
               device: Device = None) -> None:
    """Run benchmarks (comma-separated tasks) and score them as their official tools do. Tasks: vqav2, gqa,
    vizwiz, scienceqa, textvqa, pope, mme, mmbench, mmbench_cn, seed, llava_bench, llava_bench_coco, mmvet,
    demo. Shard over GPUs with `torchrun --nproc-per-node N -m vistune.cli eval ...`.

    Args:
        tasks: comma-separated task keys, e.g. pope,mme,scienceqa
        data: one subfolder per task (vqav2, gqa, pope, MME, ... as LLaVA's playground/data/eval), or one task's
        out: output folder: TASK/predictions.jsonl, metrics.json, results.md
        model: model folder, as for vistune ask (not needed to rescore saved predictions)
        tasks_option: the same, as lmms-eval takes them
        batch_size: questions per generate call
        max_new_tokens: default per task (128 short answers, 1024 judged)
        limit: first N items of each task, of each pass of a task asked twice (demo: with image, blind); smoke tests
        judge: openai:MODEL: llava_bench(_coco) and mmvet's judge, mmbench's matcher, scienceqa ensembles' teacher
        judge_base_url: OpenAI-compatible endpoint (key: $OPENAI_API_KEY)
        judge_retries: retries per judge request on 429/5xx/timeouts
        option: task option TASK.KEY=VALUE, e.g. demo.per_type=100
    """
    from vistune.eval.run import run_eval

    if (tasks is None) == (tasks_option is None):
        raise VistuneError("name the tasks once: `vistune eval pope,mme ...` or `vistune eval --tasks pope,mme ...`")
    task_list = [t.strip() for t in (tasks or tasks_option or "").split(",") if t.strip()]
    judge_obj = None
    if judge:
        from vistune.eval.judge import get_judge

        judge_obj = get_judge(judge, judge_base_url, cache=out / "judge_cache.jsonl", max_retries=judge_retries)
    results = run_eval(task_list, model, data, out, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                       judge=judge_obj, task_options=_task_options(option), device=device, parts=parts.kwargs())
    if results:
        print((out / "results.md").read_text(), end="")
        print(f"metrics: {out / 'metrics.json'}" + (f" (judge calls this run: {judge_obj.calls})" if judge_obj else ""))


def _task_options(pairs: tuple[str, ...]) -> dict[str, dict]:
    """`demo.per_type=100` -> {"demo": {"per_type": 100}} (integers parsed, `none` is None)."""
    from vistune.errors import ConfigError

    options: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        task, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--option {pair!r}: expected TASK.KEY=VALUE, e.g. demo.per_type=100")
        parsed: object = None if value.lower() == "none" else int(value) if value.lstrip("-").isdigit() else value
        options.setdefault(task, {})[name] = parsed
    return options
