"""Issue 21's checks that need no CLI run and no trained model: --limit's choice of items, the data layouts
users already have, HF Trainer field names, quiet loads and LoRA wrapping, a step folder without its stage file."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import eval_fixtures
import pytest

import vistune
from vistune.errors import CheckpointError, ConfigError, DataError


def test_limit_takes_the_first_items_of_each_batch_group() -> None:
    from vistune.eval.run import limit_items
    from vistune.eval.tasks import get_task
    from vistune.eval.tasks.base import Item

    items = [Item(str(i), "q") for i in range(5)]
    assert [it.id for it in limit_items(get_task("pope"), items, 3)] == ["0", "1", "2"]  # no groups: first N
    assert limit_items(get_task("pope"), items, None) == items
    passes = [Item(f"{i}/{view}", "q", meta={"view": view}) for view in ("with_image", "blind") for i in range(4)]
    assert [it.id for it in limit_items(get_task("demo"), passes, 2)] == \
        ["0/with_image", "1/with_image", "0/blind", "1/blind"]


def _write_image(folder: Path) -> Path:
    return eval_fixtures.image(folder / "a.png")


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}], "images": ["a.png"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
                  {"role": "assistant", "content": "A square."}], "images": ["a.png"]},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": "A square."}]},
    {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}],
     "images": ["a.png"]},
], ids=["trl-parts", "messages-strings", "inline-image-part", "llamafactory-sharegpt"])
def test_messages_and_sharegpt_layouts_read_like_llavas(record: dict, tmp_path: Path) -> None:
    from vistune.data.records import parse_record

    _write_image(tmp_path)
    llava = parse_record({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                               {"from": "gpt", "value": "A square."}]}, 0, tmp_path)
    sample = parse_record(record, 0, tmp_path)
    assert sample.images == llava.images and sample.messages == llava.messages


def test_an_unknown_layout_names_the_layouts_read(tmp_path: Path) -> None:
    from vistune.data.records import Problems, load_samples

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}]))
    with pytest.raises(DataError, match=r"no `conversations` or `messages`.*LLaVA's.*sharegpt.*messages"):
        load_samples(data, None, False, Problems())


def _stage(extra: dict) -> dict:
    return {"model": {"vision": {"path": "v"}, "llm": {"path": "l"}, "projector": "mlp2x_gelu"},
            "stages": {"finetune": {"data": {"path": "d.json"}, "output_dir": "o", "global_batch_size": 8,
                                    "micro_batch_size": 2, "lr": 1e-4, **extra}}}


@pytest.mark.parametrize("name,hint", [
    ("learning_rate", "did you mean 'lr'?"), ("num_train_epochs", "did you mean 'epochs'?"),
    ("per_device_train_batch_size", "did you mean 'micro_batch_size'"),
    ("gradient_accumulation_steps", "vistune derives it: set 'global_batch_size' = per_device_train_batch_size x "
                                    "gradient_accumulation_steps x processes"),
])
def test_hf_trainer_names_get_the_vistune_field(name: str, hint: str) -> None:
    from vistune.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(data=_stage({name: 1}))
    assert f"'stages.finetune.{name}' ({hint}" in str(e.value)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_prints_no_tensor_parallel_report(clip_dir: Path) -> None:
    """transformers' own handler holds the stream it found at import, so its logger is watched directly."""
    from vistune.model.vision import load_vision_encoder

    records = _Records()
    tp_logger = logging.getLogger("transformers.distributed.tensor_parallel")
    tp_logger.addHandler(records)
    try:
        load_vision_encoder(clip_dir)
    finally:
        tp_logger.removeHandler(records)
    assert not [m for m in records.messages if "were not sharded" in m]


def test_lora_wrapping_warns_of_nothing(clip_dir: Path, llama_dir: Path) -> None:
    from vistune.config import LoraSettings, PartsConfig
    from vistune.model.checkpoint import build_model
    from vistune.train.parts import apply_parts

    model = build_model(vistune.config.VisionConfig(path=str(clip_dir)), vistune.config.LLMConfig(path=str(llama_dir)),
                        "mlp2x_gelu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_parts(model, PartsConfig(llm="lora"), LoraSettings(r=4, alpha=8), gradient_checkpointing=False)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_step_folder_without_its_stage_file_says_why(tmp_path: Path) -> None:
    from vistune.infer.load import load_model

    step = tmp_path / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    (step / "progress.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_model(step)
