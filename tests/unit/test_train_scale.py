"""What a 7B run needs of the loop, shown on CPU at tiny size (issue 22): logits freed before backward,
packed-row boundaries handed to flash-attention once, DeepSpeed resume refused only where it cannot work,
and a loader-worker default per process (the runs are in e2e/test_train_scale_runs.py)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vistune.config import load_config
from vistune.data.batch import Example, collate
from vistune.data.records import Problems
from vistune.errors import CheckpointError
from vistune.train.packing import collate_packed, flatten_rows


class _Toy(nn.Module):
    """Logits from a linear layer and a summed cross-entropy, as the LLM computes them; nothing that backward
    needs refers to the logits tensor itself (linear saves its input, cross-entropy its log-softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 50)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int, **_: object) -> object:
        logits = self.head(torch.ones(*input_ids.shape, 4))  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logits_are_freed_before_backward(precision: str) -> None:
    """Item 8 of issue 22. Under bf16 the output seen here is accelerate's float32 copy of the logits
    (`convert_outputs_to_fp32`, which forward hooks see); it must be gone by the time backward runs."""
    from vistune.train.distributed import make_accelerator, reset_engine
    from vistune.train.loop import _accumulate, _RunOptions

    reset_engine()
    accelerator = make_accelerator("ddp", precision, 1, 1, None)
    model = accelerator.prepare(_Toy())
    seen: dict[str, object] = {}
    model.register_forward_hook(lambda m, args, out: seen.update(logits=weakref.ref(out.logits)))
    model.head.weight.register_hook(lambda grad: seen.update(alive_in_backward=seen["logits"]() is not None))
    ids = torch.tensor([[1, 2, 3, 4]])
    batch = collate([Example("a", ids[0], ids[0], None, None)], pad_token_id=0)
    loss, _, _ = _accumulate(model, [batch], _RunOptions(accelerator, 1.0, None, False), Problems())
    assert seen["alive_in_backward"] is False
    assert model.head.weight.grad is not None and loss > 0


def test_flattened_rows_carry_their_boundaries() -> None:
    """Item 10 of issue 22: flash-attention's varlen boundaries, computed once per batch."""
    def item(n: int) -> Example:
        ids = torch.arange(1, n + 1)
        return Example(str(n), ids, ids, None, None)

    packed = collate_packed([item(5), item(3), item(4)], pad_token_id=0, pack_length=9).batch
    assert packed is not None
    # rows [5 + 4 tokens] and [3 tokens + 6 padding]; the padding is a span of its own
    kw = flatten_rows(packed).flash_kwargs
    assert kw["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 18] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_k"].tolist() == kw["cu_seq_lens_q"].tolist()
    assert (kw["max_length_q"], kw["max_length_k"]) == (6, 6) and isinstance(kw["max_length_q"], int)


def _checkpoint(root: Path, engine: str | None, processes: int = 2) -> Path:
    ckpt = root / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    if engine:
        (ckpt / "engine").mkdir()
        (ckpt / "engine" / "vistune.json").write_text(json.dumps({"engine": engine, "processes": processes}))
    return ckpt


def test_deepspeed_resume_is_refused_only_where_it_cannot_work(tmp_path: Path) -> None:
    """Item 4 of issue 22 (DeepSpeed itself needs CUDA: its save and resume run in test_gpu.py)."""
    from vistune.train.engine_state import check_resumable

    ds, plain = _checkpoint(tmp_path / "ds", "zero3"), _checkpoint(tmp_path / "plain", None)
    check_resumable(ds, "zero3", deepspeed=True, processes=2)
    check_resumable(plain, "fsdp", deepspeed=False, processes=3)  # name-keyed: any process count
    with pytest.raises(CheckpointError, match="written by 2 DeepSpeed processes and this launch has 4: ZeRO's "
                                              "optimizer state is partitioned per process"):
        check_resumable(ds, "zero3", deepspeed=True, processes=4)
    with pytest.raises(CheckpointError, match=r"written under DeepSpeed \(zero3.*resume it with distributed: zero3 "
                                              "on 2 processes"):
        check_resumable(ds, "fsdp", deepspeed=False, processes=2)
    with pytest.raises(CheckpointError, match="written under ddp/fsdp.*DeepSpeed cannot load"):
        check_resumable(plain, "zero2", deepspeed=True, processes=2)


def test_loader_workers_default_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 7 of issue 22: the default splits the machine's cores among the GPU processes on it, one left for
    each training loop, at most 8; without CUDA none (the cores compute); a configured number is kept."""
    from vistune.train import distributed
    from vistune.train.distributed import loader_workers

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None) == 7  # 64 cores / 8 processes - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert loader_workers(None) == 0
    assert loader_workers(3) == 3
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    assert loader_workers(None) == 0 and loader_workers(2) == 2
    assert load_config(data={"model": {"vision": {"path": "v"}, "llm": {"path": "l"}},
                             "stages": {"s": {"data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 1,
                                              "micro_batch_size": 1, "lr": 1.0}}}).stages["s"].data.num_workers is None


def test_generate_benchmark_times_until_the_device_is_done() -> None:
    """Fair benchmarks (issue 22): `generate_throughput.timed` waits for the device (CUDA runs kernels
    asynchronously) before it stops each timer; here a device whose work takes 50 ms after the call returns."""
    import time

    from benchmarks import generate_throughput

    pending: list[float] = []

    def launch() -> None:  # returns at once, as a CUDA launch does
        pending.append(time.perf_counter() + 0.05)

    def synchronize() -> None:
        while pending:
            time.sleep(max(0.0, pending.pop() - time.perf_counter()))

    assert generate_throughput.timed(launch, 3, synchronize) >= 0.05


class _DeepSpeedAccelerator:
    """accelerate's Accelerator as the DeepSpeed resume path uses it, on one of 2 processes; its engine state is
    one file (DeepSpeed writes one partition per process)."""

    is_main_process, num_processes = True, 2

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str, **kwargs: object) -> None:
        (Path(folder) / "pytorch_model").mkdir()
        (Path(folder) / "pytorch_model" / "partition-0.pt").write_text("zero partition")
        self.save_kwargs = kwargs

    def load_state(self, folder: str, **kwargs: object) -> None:
        self.loaded = (Path(folder) / "pytorch_model" / "partition-0.pt").read_text()
        self.load_kwargs = kwargs


def test_deepspeed_resume_checkpoint_round_trip(tmp_path: Path) -> None:
    """Item 4 of issue 22, all but DeepSpeed itself: the engine's state goes into the checkpoint's engine/ (frozen
    parameters left out), with the usual scheduler and progress, atomically; resuming reads it back (not strict:
    frozen parameters come from the model as built)."""
    from vistune.train.engine_state import check_resumable, load_engine_resume, save_engine_resume
    from vistune.train.state import Progress, list_checkpoints

    accelerator = _DeepSpeedAccelerator()
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    optimizer.step()
    scheduler.step()
    final = save_engine_resume(accelerator, tmp_path, "zero3", scheduler, Progress(step=4, epoch=1), keep=2)
    assert list_checkpoints(tmp_path) == [final] and final.name == "step-000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004"]  # no staging left
    assert not (final / "trainable.safetensors").exists() and (final / "engine" / "pytorch_model").is_dir()
    assert accelerator.save_kwargs == {"exclude_frozen_parameters": True}
    check_resumable(final, "zero3", deepspeed=True, processes=2)
    fresh = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    progress = load_engine_resume(accelerator, final, fresh)
    assert (progress.step, progress.epoch) == (4, 1) and fresh.last_epoch == scheduler.last_epoch
    assert accelerator.loaded == "zero partition" and accelerator.load_kwargs == {"load_module_strict": False}


def test_compile_wraps_each_decoder_layer(clip_dir: Path, llama_dir: Path) -> None:
    """Item 10 of issue 22: `compile: true` compiles every decoder layer (FSDP2's units) rather than the decoder
    whole, whose graph FSDP2's per-layer hooks would break; parameter names are unchanged. (Whether it pays is
    measured on a GPU: tests/e2e/test_gpu.py and benchmarks/gpu_check.py.)"""
    from vistune.model.checkpoint import build_model
    from vistune.train.distributed import compile_layers

    cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
                            "stages": {"s": {"data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 1,
                                             "micro_batch_size": 1, "lr": 1.0}}})
    model = build_model(cfg.model.vision, cfg.model.llm, cfg.model.projector)
    names = [n for n, _ in model.named_parameters()]
    decoder = model.llm.get_decoder()
    assert compile_layers(model.llm) == len(decoder.layers) == 2
    assert all(layer._compiled_call_impl is not None for layer in decoder.layers)
    assert decoder._compiled_call_impl is None
    assert [n for n, _ in model.named_parameters()] == names
