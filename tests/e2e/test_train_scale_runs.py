"""What a 7B run needs, through real runs at tiny size on CPU (issue 22): a bf16 full finetune saves the LLM in
bf16, and the throughput benchmark and the prepared GPU check run to completion."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vistune.config import load_config


def test_full_finetune_saves_the_llm_in_bf16(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                             dataset_dir: Path) -> None:
    """Item 2 of issue 22: a bf16 full finetune writes the LLM in bf16 (half of float32's bytes and write time);
    the small projector keeps its float32 weights."""
    from vistune.train.loop import train_stage

    stage = {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template", "precision": "bf16",
             "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
             "output_dir": str(tmp_path / "ft"), "max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2,
             "lr": 1e-3, "tensorboard": False, "save_frozen": False}
    cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
                            "stages": {"ft": stage}})
    train_stage(cfg.model, cfg.stages["ft"], "ft")
    llm = load_file(str(tmp_path / "ft" / "llm" / "model.safetensors"))
    assert {t.dtype for t in llm.values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "ft" / "projector.safetensors")).values()} == {torch.float32}


def test_throughput_benchmark_counts_batches_made_in_loader_workers(tmp_path: Path) -> None:
    """Item 6 of issue 22: with --workers > 0 the baseline's collator runs in worker processes; its samples are
    still counted (they were 0, and the ratio divided by zero). The parts are built in a child process, so the
    parent never holds a model (on CUDA: its GPU memory) while the systems run."""
    import subprocess
    import sys

    out = tmp_path / "result.json"
    script = Path(__file__).parents[2] / "benchmarks" / "train_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--samples", "16", "--batch-size", "4", "--workers", "1",
                           "--threads", "1", "--systems", "baseline,vistune-padded", "--workdir", str(tmp_path / "w"),
                           "--output", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads(out.read_text())
    for name in ("baseline", "vistune-padded"):
        assert record["results"][name]["samples_trained"] == 16, record["results"][name]
        assert record["results"][name]["samples_per_s"] > 0
    assert record["ratios_over_baseline"]["vistune-padded"]["samples_per_s"] > 0
    assert "6 if the LLM trains fully else 4" in record["mfu_formula"]


def test_gpu_check_runs_on_cpu_and_fits_its_time(tmp_path: Path) -> None:
    """The prepared GPU check (issue 22): its limits add up to under 9 minutes, and its smoke runs (stop/resume vs
    uninterrupted, frozen-LLM align, LoRA, padded vs packed, several stages in one torchrun launch) and its
    7B-shaped step measurement pass at tiny size on CPU."""
    import subprocess
    import sys

    script = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"
    plan = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, check=True)
    assert int(plan.stdout.split("total limit ")[1].split()[0]) < 9 * 60
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--sections", "smoke,shape7b", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, check=False)
    record = json.loads(out.read_text())
    assert proc.returncode == 0 and record["ok"], json.dumps(record, indent=1)[-4000:]
    checks = record["sections"]["smoke"]["checks"]
    assert checks == {"launches_ok": True, "finite": True, "resume_follows_uninterrupted": True,
                      "packed_follows_padded": True, "llm_saved_bf16": True}
    assert record["sections"]["smoke"]["max_weight_diff_resumed"] == 0.0  # same process count, CPU: exact
    assert set(record["sections"]["shape7b"]) >= {"stage1", "stage2_lora", "stage2_lora_chunk4096"}
