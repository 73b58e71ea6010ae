"""YAML presets: every one validates, the LLaVA-1.5 recipes carry the published hyperparameters, the
tiny CPU preset runs end to end, and config mistakes fail early with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vistune.config import load_config
from vistune.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.stages


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b", "llava-1.5-7b-lora"])
def test_llava_15_published_hyperparameters(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    align, ft = cfg.stages["align"], cfg.stages["finetune"]
    assert list(cfg.stages) == ["align", "finetune"]
    assert (cfg.model.projector, cfg.model.vision.select_layer, cfg.model.vision.select_feature) == ("mlp2x_gelu", -2, "patch")
    assert (align.lr, align.global_batch_size, align.format, align.epochs) == (1e-3, 256, "plain", 1)
    assert (align.parts.projector, align.parts.llm) == ("full", "frozen")
    assert (ft.global_batch_size, ft.epochs, ft.model_max_length, ft.warmup_ratio, ft.lr_schedule, ft.weight_decay) == (
        128, 1, 2048, 0.03, "cosine", 0.0)
    assert ft.format == "vicuna_v1" and cfg.resolved().stages["finetune"].projector_from == align.output_dir
    if name.endswith("lora"):
        assert ft.parts.llm == "lora" and (ft.lora.r, ft.lora.alpha, ft.projector_lr, ft.lr) == (128, 256, 2e-5, 2e-4)
    else:
        assert ft.parts.llm == "full" and ft.lr == 2e-5


def test_unknown_field_is_named_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config field 'stages.align.lrr' \(did you mean 'lr'\?\); valid fields: "):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.align.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config field 'model.vision.layer'"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["model.vision.layer=-1"])


def test_overrides_and_value_errors() -> None:
    cfg = load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.align.lr=2e-3", "model.llm.gguf_file=m.gguf"])
    assert cfg.stages["align"].lr == 2e-3 and cfg.model.llm.gguf_file == "m.gguf"
    with pytest.raises(ConfigError, match="stages.align: global_batch_size 100 is not a multiple of micro_batch_size"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.align.global_batch_size=100"])
    with pytest.raises(ConfigError, match="stages.finetune.parts.llm: Input should be 'frozen', 'full' or 'lora'"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.finetune.parts.llm=qlora"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.align.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_registry_keys_are_checked_with_the_config() -> None:
    """Unknown format and projector keys fail at config load, before data or weights are touched."""
    with pytest.raises(ConfigError, match="stages.align.format: unknown conversation format 'vicuna'; valid keys: plain"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["stages.align.format=vicuna"])
    with pytest.raises(ConfigError, match="model.projector: unknown projector 'mlp2x_relu'; valid keys: identity"):
        load_config(CONFIGS / "llava-1.5-7b.yaml", ["model.projector=mlp2x_relu"])
