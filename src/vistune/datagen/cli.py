"""Generate training data: instruct, align, convert, mix, scienceqa (`vistune datagen ...`).

Each command is one typed function; `vistune.cli` mounts COMMANDS, and tyro builds the flags from the
signatures, the docstrings and the `Captions` and `TeacherOptions` groups. Heavy imports stay inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from tyro.conf import Positional, arg

if TYPE_CHECKING:
    from vistune.datagen.teachers import Teacher


@dataclass(frozen=True)
class Captions:
    """Where the images and their captions come from: COCO files, or a JSONL."""

    captions: Path | None = None  # COCO captions_*.json
    jsonl: Path | None = None  # JSONL of {image, captions} (instruct: and boxes) instead of COCO files
    limit: int | None = None  # first N images only

    def records(self, instances: Path | None = None) -> list:
        """The source's records (the first --limit), from --jsonl or from --captions with --instances' boxes."""
        from vistune.datagen.sources import read_coco, read_jsonl
        from vistune.errors import DataError

        if self.jsonl is not None and self.captions is None:
            records = read_jsonl(self.jsonl)
            return records[:self.limit] if self.limit is not None else records
        if self.captions is not None and self.jsonl is None:
            return read_coco(self.captions, instances, self.limit)
        raise DataError("give either --captions (COCO, with optional --instances) or --jsonl")


@dataclass(frozen=True)
class TeacherOptions:
    """The teacher model that writes the instruction data, and how it is asked."""

    teacher: str  # template | openai:MODEL | hf:PATH (a folder or a .gguf file)
    base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (key: $OPENAI_API_KEY)
    gguf_file: str | None = None  # hf teacher: GGUF file name inside PATH
    max_tokens: int | None = None  # reply length cap (openai default 1024, hf 512)
    temperature: float | None = None  # openai default 0.2, hf default 0 (greedy)
    max_retries: int = 6  # openai: retries per request on 429/5xx/timeouts
    price: Annotated[tuple[float, float] | None, arg(metavar="IN OUT")] = None
    """price per 1M prompt / completion tokens"""

    def build(self) -> Teacher:
        """The teacher, with the options its kind takes (the others do not apply to it)."""
        from vistune.datagen.teachers import RetryPolicy, get_teacher

        options: dict = {}
        length = "max_tokens"  # what the kind calls the reply length cap
        if self.teacher.startswith("openai:"):
            options = {"base_url": self.base_url, "retry": RetryPolicy(max_retries=self.max_retries),
                       "prices": self.price}
        elif self.teacher.startswith("hf:"):
            options, length = {"gguf_file": self.gguf_file}, "max_new_tokens"
        if options:  # the template teacher takes neither
            options |= {k: v for k, v in ((length, self.max_tokens), ("temperature", self.temperature))
                        if v is not None}
        return get_teacher(self.teacher, **options)


def datagen_instruct(out: Path, teacher: TeacherOptions, source: Captions = Captions(), instances: Path | None = None,
                     kinds: str = "conversation,detail,complex", concurrency: int = 8, seed: int = 0,
                     prompts: Path | None = None, reask: int = 0, no_progress: bool = False) -> None:
    """Instruction data (conversation, detail, complex) from captions and boxes by a teacher; resumable.

    Args:
        out: output .jsonl, rejects to OUT.rejects.jsonl; an existing OUT is resumed only if this command wrote it
        instances: COCO instances_*.json (boxes)
        kinds: comma-separated (default: all three)
        concurrency: requests in flight
        seed: the seed of the prompts' choices
        prompts: a folder laid out like datagen/prompts/ to use instead
        reask: ask again this many times after an invalid reply
        no_progress: no progress bar
    """
    from vistune.datagen.instruct import run_instruct

    records = source.records(instances)
    summary = run_instruct(records, [k.strip() for k in kinds.split(",") if k.strip()], teacher.build(), out,
                           seed=seed, concurrency=concurrency, progress=not no_progress, prompts_dir=prompts,
                           reask=reask)
    print(summary.text())
    if summary.unfinished:
        from vistune.errors import VistuneError

        raise VistuneError(f"{summary.unfinished} samples got no reply from the teacher and were not recorded; "
                           "run the same command again to retry them")


def datagen_align(out: Path, source: Captions = Captions(), seed: int = 0, per_caption: bool = False,
                  np_filter: bool = False, min_np_count: int = 3, max_np_count: int = 100,
                  prompts: Path | None = None) -> None:
    """Stage-1 alignment data: one brief-caption record per image (or per caption), optional noun-phrase filter.

    Args:
        out: output .jsonl (or .json)
        seed: the seed of the instructions' choice
        per_caption: one record per caption, not per image
        np_filter: the paper's noun-phrase frequency filter (needs vistune[nlp])
        min_np_count: the filter keeps noun phrases seen at least this often
        max_np_count: and caps each noun phrase at this many captions
        prompts: a folder laid out like datagen/prompts/ to use instead
    """
    from vistune.datagen.align import run_align

    print(run_align(source.records(), out, seed=seed, per_caption=per_caption, filter_noun_phrases=np_filter,
                    min_np_count=min_np_count, max_np_count=max_np_count, prompts_dir=prompts).text())


def datagen_convert(layout: Annotated[str, Positional, arg(metavar="LAYOUT")], questions: Path, out: Path,
                    annotations: Path | None = None, image_template: str | None = None, no_merge: bool = False,
                    seed: int = 0, box_frame: Literal["square", "image"] = "square",
                    max_turns: int | None = None) -> None:
    """Convert an academic VQA set in its published layout to LLaVA records with LLaVA-1.5's prompts.

    Args:
        layout: vqav2 | okvqa | gqa | ocrvqa | aokvqa | textcaps | refcoco | vg
        questions: the set's questions file
        out: output .jsonl
        annotations: vqav2/okvqa annotations, refcoco instances.json, vg image_data.json
        image_template: e.g. 'coco/train2014/COCO_train2014_{image_id:012d}.jpg'
        no_merge: one record per question instead of one per image
        seed: the seed of the prompts' choice
        box_frame: the frame box coordinates are given in (the padded square, or the image)
        max_turns: split an image's questions into conversations of this many turns
    """
    from vistune.datagen.mix import convert_vqa

    print(convert_vqa(layout, questions, annotations, out, image_template=image_template,
                      merge_per_image=not no_merge, seed=seed, box_frame=box_frame, max_turns=max_turns).text())


def datagen_mix(inputs: Annotated[tuple[str, ...], Positional, arg(metavar="FILE[:RATIO]")], out: Path,
                seed: int = 0) -> None:
    """Combine LLaVA sets, each `FILE[:RATIO]` (RATIO: the fraction kept at random, default 1), shuffled.

    Args:
        inputs: FILE[:RATIO], e.g. instruct.jsonl vqav2.jsonl:0.75
        out: output .jsonl
        seed: the seed of the sampling and the shuffle
    """
    from vistune.datagen.mix import run_mix
    from vistune.errors import DataError

    if not inputs:  # tyro reads a variable-length positional as zero or more
        raise DataError("name the sets to mix: FILE[:RATIO] ...")
    pairs = []
    for spec in inputs:
        path, sep, ratio = spec.rpartition(":")
        try:
            pairs.append((Path(path), float(ratio)) if sep else (Path(spec), 1.0))
        except ValueError:
            pairs.append((Path(spec), 1.0))  # a ':' inside a path, no ratio
    print(run_mix(pairs, out, seed=seed).text())


def datagen_scienceqa(root: Annotated[Path, Positional, arg(metavar="ROOT")], split: str = "train",
                      prompt_format: str = "QCM-LEA", out: Path | None = None) -> None:
    """ScienceQA (problems.json + pid_splits.json) to LLaVA records in the text of LLaVA's convert_sqa_to_llava.py.

    Args:
        root: ScienceQA's data/scienceqa folder (problems.json, pid_splits.json)
        split: train | val | test | minival ...
        prompt_format: INPUT-OUTPUT as LLaVA's script (default QCM-LEA, what LLaVA trained on)
        out: default ROOT/llava_{split}_{format}.json
    """
    from vistune.datagen.scienceqa import convert_scienceqa

    path, n, with_image = convert_scienceqa(root, split, prompt_format, out)
    print(f"scienceqa {split} ({prompt_format}): {n} records ({with_image} with an image) -> {path}")


COMMANDS: dict[str, Callable[..., None]] = {"instruct": datagen_instruct, "align": datagen_align,
                                            "convert": datagen_convert, "mix": datagen_mix,
                                            "scienceqa": datagen_scienceqa}
