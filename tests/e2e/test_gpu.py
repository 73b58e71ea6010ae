"""CUDA paths: a bf16 stage on the GPU and inference in bf16 there, every engine under torchrun (with resume),
bf16 FSDP with gradient checkpointing, LoRA and the frozen-LLM stage. Skipped without CUDA.
benchmarks/gpu_check.py runs this file first."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vistune
from vistune.config import load_config
from vistune.infer.engine import Sampling
from vistune.train.loop import train_stage


@pytest.mark.gpu
def test_bf16_finetune_and_ask_on_cuda(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
        "stages": {"ft": {
            "parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "output_dir": str(tmp_path / "ft"), "max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2,
            "lr": 1e-3, "precision": "bf16", "gradient_checkpointing": True, "tensorboard": False,
        }},
    })
    assert train_stage(cfg.model, cfg.stages["ft"], "ft") == tmp_path / "ft"
    engine = vistune.load(str(tmp_path / "ft"), device="cuda")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    answer = engine.ask(dataset_dir / "images" / "img_0.png", "What colour is the shape?", Sampling(max_new_tokens=4))
    assert isinstance(answer, str)


def _launch(root: Path, cfg: dict, n: int) -> None:
    import json
    import os
    import subprocess
    import sys

    (root / "run.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "vistune.cli", "train", str(root / "run.json")],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_engines_on_cuda_follow_one_process(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path,
                                            engine: str) -> None:
    """Every GPU of the machine under torchrun with the named engine (one GPU is enough: the engine
    still wraps the model) follows a plain one-process run in fp32."""
    import json

    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    n = torch.cuda.device_count()

    def stage(out: Path, **kw) -> dict:
        return {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
                "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
                "output_dir": str(out), "max_steps": 4, "global_batch_size": 4 * n, "micro_batch_size": 2,
                "lr": 1e-3, "precision": "fp32", "warmup_ratio": 0.0, "tensorboard": False, "save_frozen": False, **kw}

    model = {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}}
    save = {"save_every": 2}
    _launch(tmp_path, {"model": model, "stages": {"s": stage(tmp_path / "multi", distributed=engine, **save)}}, n)
    cfg = load_config(data={"model": model, "stages": {"s": stage(tmp_path / "one")}})
    train_stage(cfg.model, cfg.stages["s"], "s")
    rows = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "multi")]
    assert rows[1] == pytest.approx(rows[0], rel=1e-3)
    assert vistune.load(str(tmp_path / "multi"), device="cuda").model.num_image_tokens == 16
    import shutil

    shutil.copytree(tmp_path / "multi" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    if engine.startswith("zero"):  # DeepSpeed's partitioned state resumes under DeepSpeed, on as many processes
        _launch(tmp_path, {"model": model, "stages": {"s": stage(tmp_path / "resumed", distributed=engine)}}, n)
    else:  # the N-process checkpoint continues on one plain process
        cfg = load_config(data={"model": model, "stages": {"s": stage(tmp_path / "resumed")}})
        train_stage(cfg.model, cfg.stages["s"], "s")
    resumed = [json.loads(x)["loss"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(rows[0][2:], rel=1e-3)


@pytest.mark.gpu
def test_stages_with_different_engines_in_one_launch(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                     dataset_dir: Path) -> None:
    """align on ZeRO-2 then finetune on FSDP then DDP, in one torchrun: each stage gets its own engine."""
    pytest.importorskip("deepspeed")
    n = torch.cuda.device_count()
    base = {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "max_steps": 1, "global_batch_size": 2 * n, "micro_batch_size": 2, "lr": 1e-3, "precision": "bf16",
            "tensorboard": False, "save_frozen": False}
    stages = {name: {**base, "output_dir": str(tmp_path / name), "distributed": name} for name in ("zero2", "fsdp", "ddp")}
    _launch(tmp_path, {"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
                       "stages": stages}, n)
    assert all((tmp_path / name / "vistune.json").is_file() for name in stages)


@pytest.mark.gpu
def test_packing_with_flash_attention_varlen(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                             dataset_dir: Path) -> None:
    """flash_attention_2 reads the packed rows' boundaries from position ids (one flattened row)."""
    pytest.importorskip("flash_attn")
    import json

    def stage(out: Path, **data) -> dict:
        return {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template", "model_max_length": 128,
                "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images"), **data},
                "output_dir": str(out), "max_steps": 3, "global_batch_size": 16, "micro_batch_size": 4, "lr": 1e-3,
                "precision": "bf16", "warmup_ratio": 0.0, "tensorboard": False, "save_frozen": False}

    curves = []
    for name, data in (("padded", {}), ("packed", {"packing": True, "pack_length": 256})):
        cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)},
                                          "llm": {"path": str(llama_dir), "attn_implementation": "flash_attention_2"}},
                                "stages": {"s": stage(tmp_path / name, **data)}})
        train_stage(cfg.model, cfg.stages["s"], "s")
        curves.append([json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert curves[1] == pytest.approx(curves[0], rel=2e-2)  # bf16


@pytest.mark.gpu
def test_compile_and_chunked_loss_on_cuda(tmp_path: Path, clip_dir: Path, llama_dir: Path, dataset_dir: Path) -> None:
    """`compile: true` and `loss_chunk_size` train like the plain stage (bf16 tolerance)."""
    import json

    def stage(out: Path, **kw) -> dict:
        return {"parts": {"projector": "full", "llm": "full"}, "format": "chat_template",
                "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
                "output_dir": str(out), "max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
                "precision": "bf16", "warmup_ratio": 0.0, "tensorboard": False, "save_frozen": False, **kw}

    curves = []
    for name, kw in (("plain", {}), ("fast", {"compile": True, "loss_chunk_size": 16})):
        cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
                                "stages": {"s": stage(tmp_path / name, **kw)}})
        train_stage(cfg.model, cfg.stages["s"], "s")
        curves.append([json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert curves[1] == pytest.approx(curves[0], rel=2e-2)


@pytest.mark.gpu
def test_bf16_fsdp_with_checkpointing_lora_and_a_frozen_llm(tmp_path: Path, clip_dir: Path, llama_dir: Path,
                                                            dataset_dir: Path) -> None:
    """The presets' settings under torchrun, all FSDP stages in one launch (issue 22 item 5): a full finetune in
    bf16 with gradient checkpointing, LoRA, and align with the LLM frozen in bf16. Every loss is finite and falls,
    what should train did and what should not did not, and the full finetune's LLM is saved in bf16."""
    import json

    from safetensors.torch import load_file

    n = torch.cuda.device_count()
    base = {"format": "chat_template", "precision": "bf16", "gradient_checkpointing": True, "distributed": "fsdp",
            "data": {"path": str(dataset_dir / "train.json"), "image_folder": str(dataset_dir / "images")},
            "max_steps": 8, "global_batch_size": 4 * n, "micro_batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.0,
            "tensorboard": False, "save_frozen": False}
    stages = {"align": {**base, "parts": {"projector": "full", "llm": "frozen"}, "format": "plain",
                        "data": {**base["data"], "path": str(dataset_dir / "align.json")}},
              "full": {**base, "parts": {"projector": "full", "llm": "full"}, "lr": 1e-3},
              "lora": {**base, "parts": {"projector": "full", "llm": "lora"}, "lora": {"r": 8, "alpha": 16}}}
    stages = {name: {**st, "output_dir": str(tmp_path / name)} for name, st in stages.items()}
    model = {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}}
    _launch(tmp_path, {"model": model, "stages": stages}, n)
    for name in stages:
        losses = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 8 and all(math.isfinite(x) for x in losses), (name, losses)
        assert min(losses[-3:]) < losses[0], (name, losses)
    llm = load_file(str(tmp_path / "full" / "llm" / "model.safetensors"))
    assert {t.dtype for t in llm.values()} == {torch.bfloat16}
    source = load_file(str(llama_dir / "model.safetensors"))
    assert any(not torch.equal(llm[k].float(), source[k].float().bfloat16().float()) for k in llm)  # it trained
    spec = json.loads((tmp_path / "align" / "vistune.json").read_text())
    assert spec["llm"]["path"] == str(llama_dir.resolve())  # frozen: recorded by path, not rewritten
    assert (tmp_path / "lora" / "llm_adapter").is_dir()
