"""One prepared GPU check of the training paths a first real LLaVA-1.5-7B run would take (issue 22), in under
9 minutes on one GPU, from a clean copy of the repo (see benchmarks/README.md for the device command).

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke --out smoke.json     # the same code paths, tiny, on CPU
    python benchmarks/gpu_check.py --dry-run                        # the plan and the time limits only

Sections, each in its own subprocess with its own time limit (a section that fails or runs out is recorded
as such and the next one starts; the GPU memory of one never carries into the next):
  versions    python, torch, CUDA, the GPU, transformers, accelerate, peft, vistune (git revision)
  tests       `pytest -m gpu tests/e2e/test_gpu.py` (engines with resume, bf16 FSDP + checkpointing, LoRA, frozen LLM)
  smoke       preset-shaped stages on tiny parts under `torchrun --nproc_per_node 1`: bf16 full finetune with
              gradient checkpointing under FSDP stopped and resumed vs uninterrupted; align with the LLM frozen
              in bf16; LoRA; padded vs packed (SDPA). Several FSDP stages share one launch.
  shape7b     a random-weight Vicuna-7B + CLIP-L/336 model in bf16 (tower float32, as trained): peak memory and
              seconds per step for stage 1 (32 x 620 tokens, projector trains) and LoRA stage 2 (16 x 2048,
              gradient checkpointing), stage 2 also with loss_chunk_size 4096
  throughput  benchmarks/train_throughput.py --shape 1b: the baseline, vistune padded and vistune packed
All results go into one JSON file (--out). --cpu-smoke runs every section on CPU at tiny sizes with the DDP
engine (accelerate sets FSDP up on GPUs only), so that the suite can test this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Section -> time limit in seconds on the GPU; together under 9 minutes.
LIMITS = {"versions": 30, "tests": 160, "smoke": 120, "shape7b": 90, "throughput": 130}
CPU_SLOWER = 4  # --cpu-smoke: the limits times this (tiny parts, but a 2-core CPU and torch's start-up)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                 patch_size=8)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _limit(section: str, cpu: bool, share: float = 1.0) -> float:
    return LIMITS[section] * share * (CPU_SLOWER if cpu else 1)


def _run(cmd: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "tail": out[-2500:]}


# --------------------------------------------------------------------------------------------- sections

def versions(cpu: bool, work: Path) -> dict:
    import accelerate
    import peft
    import torch
    import transformers
    from train_tiny import environment

    machine, vers = environment()
    gpu = None if cpu else torch.cuda.get_device_name()
    return {"ok": cpu or torch.cuda.is_available(), "gpu": gpu, "cuda": torch.version.cuda, "machine": machine,
            "versions": {**vers, "torch": torch.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__, "peft": peft.__version__}}


def tests(cpu: bool, work: Path) -> dict:
    r = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", str(REPO / "tests" / "e2e" / "test_gpu.py")],
             _limit("tests", cpu) - 5)
    return {"ok": r["rc"] == 0, **r}


def _stage(folder: Path, out: Path, engine: str, **kw) -> dict:
    base = {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template", "precision": "bf16",
            "gradient_checkpointing": True, "distributed": engine, "model_max_length": 128,
            "data": {"path": str(folder / "train.json"), "image_folder": str(folder / "images")},
            "output_dir": str(out), "max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
            "warmup_ratio": 0.0, "tensorboard": False, "save_frozen": False}
    return {**base, **kw}


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def smoke(cpu: bool, work: Path) -> dict:
    """Three `torchrun --nproc_per_node 1` launches of tiny preset-shaped stages (module docstring)."""
    from vistune.testing import build_bpe_tokenizer, build_clip, build_dataset, build_llama
    from safetensors.torch import load_file

    engine = "ddp" if cpu else "fsdp"
    model = {"vision": {"path": str(build_clip(work / "clip"))},
             "llm": {"path": str(build_llama(work / "llama", build_bpe_tokenizer(work / "tok"))),
                     "attn_implementation": "sdpa"}}
    data = build_dataset(work / "data")
    whole = {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": 3}  # one step = the whole data set
    stages = {
        "align": _stage(data, work / "align", engine, parts={"projector": "full", "llm": "frozen"}, format="plain",
                        data={"path": str(data / "align.json"), "image_folder": str(data / "images")}),
        "lora": _stage(data, work / "lora", engine, parts={"projector": "full", "llm": "lora"},
                       lora={"r": 8, "alpha": 16}),
        "padded": _stage(data, work / "padded", engine, **whole),
        "packed": _stage(data, work / "packed", engine, **whole,
                         data={**_stage(data, work, engine)["data"], "packing": True, "pack_length": 256}),
        "full": _stage(data, work / "full", engine, save_every=3),
    }
    resumed = {**stages["full"], "output_dir": str(work / "resumed")}
    launches = {}
    for name, st, share in (("all", stages, 0.5), ("stop", {"full": {**resumed, "stop_after_steps": 3}}, 0.2),
                            ("resume", {"full": resumed}, 0.2)):
        (work / f"{name}.json").write_text(json.dumps({"model": model, "stages": st}))
        launches[name] = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                               "-m", "vistune.cli", "train", str(work / f"{name}.json")], _limit("smoke", cpu, share))
    result: dict = {"engine": engine, "launches": launches, "losses": {}}
    for name in [*stages, "resumed"]:
        path = work / name / "metrics.jsonl"
        result["losses"][name] = _losses(work / name) if path.is_file() else None
    losses = result["losses"]
    checks = {"launches_ok": all(r["rc"] == 0 for r in launches.values()),
              "finite": all(v and all(math.isfinite(x) for x in v) for v in losses.values())}
    if checks["launches_ok"]:
        checks["resume_follows_uninterrupted"] = len(losses["resumed"]) == len(losses["full"]) == 6 and all(
            math.isclose(a, b, rel_tol=1e-2) for a, b in zip(losses["full"], losses["resumed"]))
        checks["packed_follows_padded"] = all(math.isclose(a, b, rel_tol=2e-2)
                                              for a, b in zip(losses["padded"], losses["packed"]))
        full, resumed = (load_file(str(work / d / "llm" / "model.safetensors")) for d in ("full", "resumed"))
        result["max_weight_diff_resumed"] = max(float((full[k].float() - resumed[k].float()).abs().max()) for k in full)
        checks["llm_saved_bf16"] = {str(t.dtype) for t in full.values()} == {"torch.bfloat16"}
    result["checks"] = checks
    return {"ok": all(checks.values()) and len(checks) > 2, **result}


def _vlm(cpu: bool, llm_cfg: dict):  # noqa: ANN202
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vistune.model.projector import build_projector
    from vistune.model.vision import VisionTower
    from vistune.model.vlm import VisionLanguageModel

    device = "cpu" if cpu else "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        encoder = CLIPVisionModel(CLIPVisionConfig(**(TINY_CLIP if cpu else CLIP_L_336)))
        llm = LlamaForCausalLM(LlamaConfig(**llm_cfg)).to(torch.bfloat16)  # random weights, held as trained
        tower = VisionTower(encoder, -2, "patch")
        projector = build_projector("mlp2x_gelu", tower.hidden_size, llm_cfg["hidden_size"])
    return VisionLanguageModel(tower, projector, llm)


def _steps(model, llm_mode: str, rows: int, length: int, steps: int, chunk: int | None) -> dict:  # noqa: ANN001
    """`train_stage`'s own step (`_accumulate`, the engine's autocast, fused AdamW on CUDA) on random batches."""
    import torch

    from vistune.config import LoraSettings, PartsConfig
    from vistune.data.batch import Example, collate
    from vistune.data.records import Problems
    from vistune.model.vlm import IMAGE_TOKEN_ID
    from vistune.train.distributed import make_accelerator, reset_engine
    from vistune.train.loop import _accumulate, _RunOptions
    from vistune.train.parts import apply_parts, param_groups

    apply_parts(model, PartsConfig(projector="full", llm=llm_mode), LoraSettings(r=128, alpha=256), True)
    reset_engine()
    accelerator = make_accelerator("ddp", "bf16", 1, rows, 1.0)
    optimizer = torch.optim.AdamW(param_groups(model, 2e-5, None, 0.0), lr=2e-5,
                                  fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    n_img, size = model.num_image_tokens, model.vision.encoder.config.image_size
    ids = torch.randint(10, model.llm.get_input_embeddings().num_embeddings, (rows, length))
    ids[:, 1: 1 + n_img] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    pixels = torch.randn(rows, 3, size, size)
    batch = collate([Example(str(i), ids[i], labels[i], pixels[i: i + 1], None) for i in range(rows)], 0)
    opts = _RunOptions(accelerator, 1.0, chunk, False)
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        sync()
        t = time.perf_counter()
        loss, _, _ = _accumulate(model, [batch], opts, Problems())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None
    return {"rows": rows, "tokens": length, "s_per_step": sum(times[1:]) / steps, "peak_gib": peak, "loss": loss,
            "ok": math.isfinite(loss)}


def shape7b(cpu: bool, work: Path) -> dict:
    import torch

    llm_cfg = TINY_LLM if cpu else VICUNA_7B
    shapes = {"stage1": ((2, 96) if cpu else (32, 620)), "stage2": ((2, 192) if cpu else (16, 2048))}
    result = {}
    for name, mode, chunk in (("stage1", "frozen", None), ("stage2_lora", "lora", None),
                              ("stage2_lora_chunk4096", "lora", 4096)):
        gc.collect()  # the previous model, its optimizer and accelerator: their GPU memory must not count here
        if not cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rows, length = shapes["stage1" if name == "stage1" else "stage2"]
        result[name] = _steps(_vlm(cpu, llm_cfg), mode, rows, length, 1 if cpu else 3, chunk)
    return {"ok": all(r["ok"] for r in result.values()), **result}


def throughput(cpu: bool, work: Path) -> dict:
    out = work / "throughput.json"
    shape = ["--samples", "16", "--batch-size", "4"] if cpu else ["--device", "cuda", "--shape", "1b", "--samples",
                                                                   "64", "--batch-size", "8", "--gradient-checkpointing"]
    r = _run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), *shape, "--output", str(out),
              "--workdir", str(work / "tt")], _limit("throughput", cpu) - 5)
    record = json.loads(out.read_text()) if out.is_file() else {}
    return {"ok": r["rc"] == 0, **r, "results": record.get("results"), "ratios": record.get("ratios_over_baseline")}


SECTIONS = {"versions": versions, "tests": tests, "smoke": smoke, "shape7b": shape7b, "throughput": throughput}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--cpu-smoke", action="store_true", help="every section on CPU at tiny sizes (for the suite)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # one section, in a child
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        result = SECTIONS[args.section](args.cpu_smoke, args.workdir)
        (args.workdir / "result.json").write_text(json.dumps(result, default=str))
        return 0
    chosen = args.sections.split(",")
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    if args.dry_run:
        for name in chosen:
            print(f"{name:11} limit {LIMITS[name]:>4} s")
        print(f"total limit {sum(LIMITS[n] for n in chosen)} s")
        return 0
    record: dict = {"check": "gpu_check", "cpu_smoke": args.cpu_smoke, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="vistune-gpu-check-") as tmp:
        for name in chosen:
            work = Path(tmp) / name
            work.mkdir()
            cmd = [sys.executable, __file__, "--section", name, "--workdir", str(work)] + ["--cpu-smoke"] * args.cpu_smoke
            r = _run(cmd, _limit(name, args.cpu_smoke))
            done = work / "result.json"
            record["sections"][name] = (json.loads(done.read_text()) if done.is_file()
                                        else {"ok": False, "rc": r["rc"], "tail": r["tail"]})
            record["sections"][name]["seconds"] = r["seconds"]
            print(f"{name:11} {'ok' if record['sections'][name]['ok'] else 'FAILED':7} {r['seconds']:6.1f} s", flush=True)
            args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # kept if a later section hangs
    record["ok"] = all(s["ok"] for s in record["sections"].values())
    record["command"] = " ".join([sys.executable, *sys.argv])
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
