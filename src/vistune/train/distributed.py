"""Several processes: which engine (DDP, FSDP, DeepSpeed ZeRO) and how batches are split among them.

The engines are accelerate's: the stage's `distributed` key picks accelerate's plugin, and
`accelerate launch` / `torchrun` start the processes (see configs/accelerate/ and docs/training.md). What is
ours is only the bookkeeping that makes N processes train exactly like one with the same global batch:

- every process computes the same epoch order (a pure function of seed and epoch) and takes every
  N-th micro-batch of it, so one optimizer step covers the same samples whatever N is;
- the supervised-token count of an accumulation window is summed over processes, so the loss is
  still "sum over tokens / tokens in the global batch" (DDP and FSDP then average gradients over
  processes, DeepSpeed also over accumulation steps; `loss_scale` undoes both).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Literal, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch.utils.data import Sampler

from vistune.config import RunConfig
from vistune.errors import ConfigError

Engine = Literal["ddp", "fsdp", "zero2", "zero3"]


class _EpochBatches(Protocol):
    def batches(self, epoch: int) -> list[list[int]]: ...


class ShardedBatchSampler(Sampler[list[int]]):
    """This process's micro-batches: every `world`-th of the epoch's global list, from global batch `skip`.

    The global list is cut to a multiple of `world` (at most world-1 micro-batches a epoch are dropped),
    so that every process runs the same number of forward/backward passes: a process left without a
    batch while the others wait in an all-reduce would hang the job.
    """

    def __init__(self, inner: _EpochBatches, rank: int = 0, world: int = 1) -> None:
        self.inner, self.rank, self.world = inner, rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """`skip_batches` counts global micro-batches already trained in this epoch (all processes)."""
        self.epoch, self.skip = epoch, skip_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global micro-batches, cut to a multiple of the process count."""
        all_batches = self.inner.batches(epoch)
        return all_batches[: len(all_batches) - len(all_batches) % self.world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip:][self.rank:: self.world]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)[self.skip:][self.rank:: self.world])


# Collective timeout when the run config gives none (RunConfig.collective_timeout_minutes). torch's default
# (10 minutes) is shorter than rank 0's save of a 7B full finetune (tens of GB) on slow shared storage, while
# the other ranks wait at a barrier: they would time out and kill rank 0 mid-save, and a rerun would too.
DEFAULT_TIMEOUT_MINUTES = RunConfig.model_fields["collective_timeout_minutes"].default


def process_state(timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> PartialState:
    """The processes of this run (accelerate's). Without CUDA, processes started by torchrun or
    `accelerate launch` join over gloo on the CPU (accelerate would otherwise run each one alone).
    `timeout_minutes` bounds every collective (barriers included); it applies when the processes first
    join, i.e. at the first call in a launch."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))
    return PartialState(cpu=not torch.cuda.is_available(), **timeout.to_kwargs())


def loader_workers(configured: int | None) -> int:
    """DataLoader workers for this process: `configured`, or by default (None) the CPU cores available to each
    process on this machine minus one for the training loop itself, at most 8 (more rarely pays: by then the
    GPU waits on nothing); 0 without CUDA, where the cores run the model."""
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, per_process - 1))


def reset_engine() -> None:
    """Forget the previous stage's engine before a stage builds its own Accelerator. accelerate keeps
    one process-wide state and writes the engine it set up (FSDP, DeepSpeed) into it, and a later
    Accelerator would then build on that engine (and miss its plugin). Transformers' Trainer resets the
    same state between runs; the processes themselves (PartialState) are kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    state = process_state()
    if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # An engine was set up, so the run was launched (accelerate sets engines up on launched runs only),
        # and PartialState had the multi-process type, even for one process (torchrun --nproc_per_node 1):
        # restore that, not NO, or the next stage's FSDP/DeepSpeed plugin would be ignored.
        base = DistributedType.MULTI_GPU if state.device.type == "cuda" else DistributedType.MULTI_CPU
        PartialState._shared_state["distributed_type"] = base


def make_accelerator(engine: Engine, precision: str, accum: int, micro_batch_size: int,
                     max_grad_norm: float | None, **trackers: object) -> Accelerator:
    """An Accelerator for `engine`. The engine applies when the run was started by a launcher (torchrun,
    `accelerate launch`; one process or many); a plain `vistune train` runs one process without one, so a
    config written for 8 GPUs also runs on a laptop. DDP needs no `find_unused_parameters` (a graph walk
    every step): the model uses every trainable weight in every batch (`VisionLanguageModel.embed` sends
    text-only batches through the projector too). `trackers`: `log_with`/`project_config` (tracking.py)."""
    mixed = "bf16" if precision == "bf16" else "no"
    cpu = not torch.cuda.is_available()
    launched = "WORLD_SIZE" in os.environ or process_state().num_processes > 1
    # accelerate marks its engine in the environment (from `accelerate launch --use_fsdp`, or from the plugin
    # of an earlier Accelerator in this process, i.e. an earlier stage); the stage's own choice must win.
    for flag in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(flag, None)
    if not launched or engine == "ddp":
        accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, **trackers)
    elif engine == "fsdp":
        accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, fsdp_plugin=fsdp_plugin(mixed), **trackers)
    else:
        accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, deepspeed_plugin=deepspeed_plugin(
            engine, accum, micro_batch_size, max_grad_norm, mixed), **trackers)
    if launched:
        check_engine(engine, accelerator.distributed_type)
    return accelerator


def check_engine(engine: Engine, distributed_type: DistributedType) -> None:
    """Fail rather than train quietly on another engine than the config names (accelerate, for one,
    runs DeepSpeed only on GPUs and would fall back to plain data parallelism on CPU)."""
    expected = {"ddp": {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO},
                "fsdp": {DistributedType.FSDP}, "zero2": {DistributedType.DEEPSPEED},
                "zero3": {DistributedType.DEEPSPEED}}[engine]
    if distributed_type not in expected:
        hint = " accelerate runs DeepSpeed and FSDP on GPUs only;" if engine != "ddp" else ""
        raise ConfigError(f"distributed: {engine} was asked for, but accelerate set up {distributed_type.value}.{hint} "
                          "use distributed: ddp or fsdp here, or launch on GPUs")


def fsdp_plugin(mixed: str = "no") -> object:
    """FSDP2 (torch's `fully_shard`), full sharding, units set in `wrap_policy_for`. FSDP2 shards frozen and
    trained parameters side by side, as LLaVA's stages need. Under bf16, weights are gathered in bf16 but
    gradients are reduced in fp32 (accelerate's default reduces in bf16): a sum over hundreds of ranks and
    micro-batches loses bits in bf16's 8-bit mantissa, and DDP/ZeRO reduce the fp32 gradients too."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed == "bf16" else None
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          auto_wrap_policy="transformer_based_wrap",
                                          state_dict_type="FULL_STATE_DICT", mixed_precision_policy=policy)


def wrap_policy_for(accelerator: Accelerator, llm: object) -> None:
    """Point FSDP's auto-wrap at its units (`fsdp_unit_names`)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_unit_names(llm)


def fsdp_unit_names(llm: object) -> list[str]:
    """Module classes that become FSDP units: the LLM's decoder layers (transformers lists them in
    `_no_split_modules`), the vision tower, and the embedding tables. Whatever no unit claims stays in the
    root unit, whose weights are gathered for the whole forward and backward; at LLaVA-1.5-7B the tower and the
    token embeddings are ~0.45B parameters there otherwise (the projector and lm_head remain)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"distributed: fsdp needs the LLM's layer class to shard by, and {type(base).__name__} "
                          "lists none in _no_split_modules; use ddp or zero2/zero3")
    units = [*names, "VisionTower"]
    out_emb = base.get_output_embeddings()
    # Tied input/output embeddings are one parameter, which FSDP cannot shard into two units (lm_head stays in root).
    if out_emb is None or out_emb.weight is not base.get_input_embeddings().weight:
        units.append("Embedding")
    return units


def compile_layers(llm: object) -> int:
    """`torch.compile` each decoder layer in place (parameter names, hence checkpoints, stay as they are); returns
    how many. Per layer, as torchtitan compiles under FSDP2: FSDP2's all-gather and reshard hooks run around each
    layer (its unit), so a whole-decoder graph would break at every one of them; the layers share one compiled
    graph. Whether compiling pays on a given GPU is measured by benchmarks/gpu_check.py; it is off by default."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.get_decoder().modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"compile: {type(base).__name__} lists no decoder layer class in _no_split_modules; "
                          "set compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


def deepspeed_plugin(engine: Engine, accum: int, micro_batch_size: int, max_grad_norm: float | None,
                     mixed: str) -> object:
    """DeepSpeed ZeRO-2 or -3 with our accumulation and clipping. ZeRO-3 gathers 16-bit weights on save,
    as LLaVA's zero3.json does, so the final checkpoint is written unsharded."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"distributed: {engine} needs DeepSpeed: pip install deepspeed") from None
    from accelerate import DeepSpeedPlugin

    stage = 2 if engine == "zero2" else 3
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": mixed == "bf16"},
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})},
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def loss_scale(accelerator: Accelerator, accum: int) -> float:
    """Factor on each micro-batch's loss (already divided by the global token count) so that the engine's
    own averaging leaves gradients equal to one process's: DDP/FSDP divide by the process count,
    DeepSpeed also by its accumulation steps."""
    scale = float(accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        scale *= accum
    return scale


def set_window_end(accelerator: Accelerator, last: bool) -> None:
    """Tell DeepSpeed whether this micro-batch ends the accumulation window, so it steps exactly at our
    window ends (the last window of an epoch may be short). accelerate reads this flag in `backward`;
    other engines use `no_sync` instead."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last)  # accelerate's own setter (used by `accumulate`)


def is_sharded(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether this process holds only a shard of the weights (FSDP, ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return any(isinstance(p, DTensor) for p in model.parameters())
