"""Distributed training's setup, checked in one process: the batch shards of each process, the FSDP plugin and
its units, the engine accelerate set up, the DeepSpeed config as DeepSpeed reads it, the accelerate presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistune.config import load_config
from vistune.train.distributed import ShardedBatchSampler


class _Fixed:
    def __init__(self, n: int) -> None:
        self.n = n

    def batches(self, epoch: int) -> list[list[int]]:
        return [[epoch, i] for i in range(self.n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_split_each_epoch_evenly(world: int) -> None:
    shards = [ShardedBatchSampler(_Fixed(10), rank, world) for rank in range(world)]
    kept = 10 - 10 % world
    got = [b for s in shards for b in s]
    assert sorted(got) == _Fixed(10).batches(0)[:kept]
    assert len({len(s) for s in shards}) == 1  # every process runs as many micro-batches
    for s in shards:
        s.set_epoch(1, skip_batches=world * 2)  # two global windows of one micro-batch each done
    assert sorted(b for s in shards for b in s) == _Fixed(10).batches(1)[world * 2: kept]


def test_fsdp_reduces_in_fp32_and_shards_tower_and_embeddings(clip_dir: Path, llama_dir: Path) -> None:
    """Item 9 of issue 22 (FSDP itself runs on GPUs only, see test_gpu.py): under bf16 the plugin gathers weights
    in bf16 but reduces gradients in fp32, also after accelerate applies the stage's precision to it; the vision
    tower and the embedding tables are units of their own, named by classes the model has; tied embeddings
    (one parameter for input and output) are left to the root unit."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from transformers import LlamaConfig, LlamaForCausalLM

    from vistune.model.checkpoint import build_model
    from vistune.train.distributed import fsdp_plugin, fsdp_unit_names

    plugin = fsdp_plugin("bf16")
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with the plugin
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_plugin("no").mixed_precision_policy is None

    cfg = load_config(data={"model": {"vision": {"path": str(clip_dir)}, "llm": {"path": str(llama_dir)}},
                            "stages": {"s": {"data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 1,
                                             "micro_batch_size": 1, "lr": 1}}})
    model = build_model(cfg.model.vision, cfg.model.llm, cfg.model.projector, torch.float32, torch.float32)
    names = fsdp_unit_names(model.llm)
    assert names == ["LlamaDecoderLayer", "VisionTower", "Embedding"]
    found = {name: get_module_class_from_name(model, name) for name in names}
    assert all(found.values()), found
    assert found["Embedding"] is type(model.llm.get_input_embeddings())
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True))
    assert fsdp_unit_names(tied) == ["LlamaDecoderLayer", "VisionTower"]


def test_an_engine_accelerate_did_not_set_up_is_an_error() -> None:
    from accelerate.utils import DistributedType

    from vistune.errors import ConfigError
    from vistune.train.distributed import check_engine

    check_engine("fsdp", DistributedType.FSDP)
    check_engine("zero3", DistributedType.DEEPSPEED)
    check_engine("ddp", DistributedType.MULTI_CPU)
    with pytest.raises(ConfigError, match="zero2 was asked for, but accelerate set up MULTI_CPU. accelerate runs "
                                          "DeepSpeed and FSDP on GPUs only"):
        check_engine("zero2", DistributedType.MULTI_CPU)
    with pytest.raises(ConfigError, match="fsdp was asked for"):
        check_engine("fsdp", DistributedType.MULTI_GPU)
    with pytest.raises(ConfigError, match="ddp was asked for, but accelerate set up FSDP"):
        check_engine("ddp", DistributedType.FSDP)


@pytest.mark.parametrize("engine,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_is_valid_for_deepspeed(engine: str, stage: int) -> None:
    """The plugin's config as DeepSpeed itself reads it (DeepSpeed runs only on GPUs, see test_gpu.py)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from vistune.train.distributed import deepspeed_plugin

    plugin = deepspeed_plugin(engine, accum=4, micro_batch_size=2, max_grad_norm=1.0, mixed="bf16")
    assert plugin.zero_stage == stage
    parsed = DeepSpeedConfig(dict(plugin.deepspeed_config, train_batch_size=8))  # one process here
    assert (parsed.zero_optimization_stage, parsed.gradient_accumulation_steps, parsed.gradient_clipping) == (stage, 4, 1.0)
    assert parsed.zero_config.gather_16bit_weights_on_model_save == (stage == 3)


@pytest.mark.parametrize("name,machines,processes", [("1node-8gpu", 1, 8), ("multinode-2x8gpu", 2, 16)])
def test_accelerate_presets_read_as_accelerate_reads_them(name: str, machines: int, processes: int) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(Path(__file__).parents[2] / "configs" / "accelerate" / f"{name}.yaml"))
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.num_processes) == ("MULTI_GPU", machines, processes)
    assert str(cfg.mixed_precision).split(".")[-1].lower() == "no"  # the stage's precision decides
