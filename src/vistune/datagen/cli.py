"""`vistune datagen ...`: the data-generation subcommands (instruct, align, convert, mix), each one
typed function, and the argparse group that `vistune.cli` mounts. Heavy imports stay inside the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def datagen_instruct(out: Path, teacher: str, kinds: str, captions: Path | None, instances: Path | None,
                     jsonl: Path | None, base_url: str | None, gguf_file: str | None, limit: int | None,
                     concurrency: int, seed: int, max_tokens: int | None, temperature: float | None,
                     max_retries: int, price: list[float] | None, prompts: Path | None, reask: int,
                     no_progress: bool) -> None:
    """Instruction data (conversation, detail, complex) from captions and boxes by a teacher; resumable."""
    from vistune.datagen.instruct import run_instruct
    from vistune.datagen.teachers import RetryPolicy, get_teacher

    records = _datagen_records(captions, instances, jsonl, limit)
    options: dict = {}
    if teacher.startswith("openai:"):
        options = {"base_url": base_url, "retry": RetryPolicy(max_retries=max_retries),
                   "prices": tuple(price) if price else None}
        options |= {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
    elif teacher.startswith("hf:"):
        options = {"gguf_file": gguf_file}
        options |= {k: v for k, v in (("max_new_tokens", max_tokens), ("temperature", temperature)) if v is not None}
    summary = run_instruct(records, [k.strip() for k in kinds.split(",") if k.strip()], get_teacher(teacher, **options),
                           out, seed=seed, concurrency=concurrency, progress=not no_progress, prompts_dir=prompts,
                           reask=reask)
    print(summary.text())
    if summary.unfinished:
        from vistune.errors import VistuneError

        raise VistuneError(f"{summary.unfinished} samples got no reply from the teacher and were not recorded; "
                           "run the same command again to retry them")


def datagen_align(out: Path, captions: Path | None, jsonl: Path | None, limit: int | None, seed: int,
                  per_caption: bool, np_filter: bool, min_np_count: int, max_np_count: int,
                  prompts: Path | None) -> None:
    """Stage-1 alignment data: one brief-caption record per image (or per caption), optional noun-phrase filter."""
    from vistune.datagen.align import run_align

    records = _datagen_records(captions, None, jsonl, limit)
    print(run_align(records, out, seed=seed, per_caption=per_caption, filter_noun_phrases=np_filter,
                    min_np_count=min_np_count, max_np_count=max_np_count, prompts_dir=prompts).text())


def datagen_convert(layout: str, questions: Path, annotations: Path | None, out: Path, image_template: str | None,
                    no_merge: bool, seed: int, box_frame: str, max_turns: int | None) -> None:
    """Convert an academic VQA set in its published layout to LLaVA records with LLaVA-1.5's prompts."""
    from vistune.datagen.mix import convert_vqa

    print(convert_vqa(layout, questions, annotations, out, image_template=image_template,
                      merge_per_image=not no_merge, seed=seed, box_frame=box_frame, max_turns=max_turns).text())


def datagen_mix(inputs: list[str], out: Path, seed: int) -> None:
    """Combine LLaVA sets, each `FILE[:RATIO]` (RATIO: the fraction kept at random, default 1), shuffled."""
    from vistune.datagen.mix import run_mix

    pairs = []
    for spec in inputs:
        path, sep, ratio = spec.rpartition(":")
        try:
            pairs.append((Path(path), float(ratio)) if sep else (Path(spec), 1.0))
        except ValueError:
            pairs.append((Path(spec), 1.0))  # a ':' inside a path, no ratio
    print(run_mix(pairs, out, seed=seed).text())


def datagen_scienceqa(root: Path, split: str, prompt_format: str, out: Path | None) -> None:
    """ScienceQA (problems.json + pid_splits.json) to LLaVA records in the text of LLaVA's convert_sqa_to_llava.py."""
    from vistune.datagen.scienceqa import convert_scienceqa

    path, n, with_image = convert_scienceqa(root, split, prompt_format, out)
    print(f"scienceqa {split} ({prompt_format}): {n} records ({with_image} with an image) -> {path}")


def _datagen_records(captions: Path | None, instances: Path | None, jsonl: Path | None, limit: int | None) -> list:
    from vistune.datagen.sources import read_coco, read_jsonl
    from vistune.errors import DataError

    if (captions is None) == (jsonl is None):
        raise DataError("give either --captions (COCO, with optional --instances) or --jsonl")
    if jsonl is not None:
        records = read_jsonl(jsonl)
        return records[:limit] if limit is not None else records
    return read_coco(captions, instances, limit)  # type: ignore[arg-type]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `datagen` command group, with one subparser per command in COMMANDS."""
    d = sub.add_parser("datagen", help="generate training data (instruction, alignment, mixtures)",
                       description="Generate training data: instruct, align, convert, mix, scienceqa.")
    dsub = d.add_subparsers(dest="datagen_command", required=True)
    di = dsub.add_parser("instruct", help=datagen_instruct.__doc__, description=datagen_instruct.__doc__)
    di.add_argument("--captions", type=Path, help="COCO captions_*.json")
    di.add_argument("--instances", type=Path, help="COCO instances_*.json (boxes)")
    di.add_argument("--jsonl", type=Path, help="JSONL of {image, captions, boxes} instead of COCO files")
    di.add_argument("--kinds", default="conversation,detail,complex", help="comma-separated (default: all three)")
    di.add_argument("--teacher", required=True, help="template | openai:MODEL | hf:PATH (a folder or a .gguf file)")
    di.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (key: $OPENAI_API_KEY)")
    di.add_argument("--gguf-file", help="hf teacher: GGUF file name inside PATH")
    di.add_argument("--out", type=Path, required=True, help="output .jsonl; rejects go to OUT.rejects.jsonl; "
                    "an existing OUT is resumed only when this command wrote it")
    di.add_argument("--limit", type=int, help="first N images only")
    di.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--max-tokens", type=int, help="reply length cap (openai default 1024, hf 512)")
    di.add_argument("--temperature", type=float, help="openai default 0.2, hf default 0 (greedy)")
    di.add_argument("--max-retries", type=int, default=6, help="openai: retries per request on 429/5xx/timeouts")
    di.add_argument("--price", type=float, nargs=2, metavar=("IN", "OUT"), help="price per 1M prompt / completion tokens")
    di.add_argument("--prompts", type=Path, help="a folder laid out like datagen/prompts/ to use instead")
    di.add_argument("--reask", type=int, default=0, help="ask again this many times after an invalid reply")
    di.add_argument("--no-progress", action="store_true")
    da = dsub.add_parser("align", help=datagen_align.__doc__, description=datagen_align.__doc__)
    da.add_argument("--captions", type=Path, help="COCO captions_*.json")
    da.add_argument("--jsonl", type=Path, help="JSONL of {image, captions}")
    da.add_argument("--out", type=Path, required=True, help="output .jsonl (or .json)")
    da.add_argument("--limit", type=int)
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--per-caption", action="store_true", help="one record per caption, not per image")
    da.add_argument("--np-filter", action="store_true", help="the paper's noun-phrase frequency filter (needs vistune[nlp])")
    da.add_argument("--min-np-count", type=int, default=3)
    da.add_argument("--max-np-count", type=int, default=100)
    da.add_argument("--prompts", type=Path)
    dc = dsub.add_parser("convert", help=datagen_convert.__doc__, description=datagen_convert.__doc__)
    dc.add_argument("layout", help="vqav2 | okvqa | gqa | ocrvqa | aokvqa | textcaps | refcoco | vg")
    dc.add_argument("--questions", type=Path, required=True)
    dc.add_argument("--annotations", type=Path, help="vqav2/okvqa annotations, refcoco instances.json, vg image_data.json")
    dc.add_argument("--out", type=Path, required=True)
    dc.add_argument("--image-template", help="e.g. 'coco/train2014/COCO_train2014_{image_id:012d}.jpg'")
    dc.add_argument("--no-merge", action="store_true", help="one record per question instead of one per image")
    dc.add_argument("--seed", type=int, default=0)
    dc.add_argument("--box-frame", default="square", choices=["square", "image"])
    dc.add_argument("--max-turns", type=int, help="split an image's questions into conversations of this many turns")
    ds = dsub.add_parser("scienceqa", help=datagen_scienceqa.__doc__, description=datagen_scienceqa.__doc__)
    ds.add_argument("root", type=Path, help="ScienceQA's data/scienceqa folder (problems.json, pid_splits.json)")
    ds.add_argument("--split", default="train", help="train | val | test | minival ... (default train)")
    ds.add_argument("--prompt-format", default="QCM-LEA", help="INPUT-OUTPUT as LLaVA's script (default QCM-LEA, "
                    "what LLaVA trained on)")
    ds.add_argument("--out", type=Path, help="default ROOT/llava_{split}_{format}.json")
    dm = dsub.add_parser("mix", help=datagen_mix.__doc__, description=datagen_mix.__doc__)
    dm.add_argument("inputs", nargs="+", help="FILE[:RATIO], e.g. instruct.jsonl vqav2.jsonl:0.75")
    dm.add_argument("--out", type=Path, required=True)
    dm.add_argument("--seed", type=int, default=0)


COMMANDS: dict[str, Callable[..., None]] = {"instruct": datagen_instruct, "align": datagen_align,
                                            "convert": datagen_convert, "mix": datagen_mix,
                                            "scienceqa": datagen_scienceqa}
