"""YAML presets: each validates and starts its LLM-training stages from a projector that exists and fits, presets
that share a folder agree on what it holds, the LLaVA-1.5 recipes carry the published hyperparameters stage by
stage, and config mistakes fail early with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vistune.config import RunConfig, load_config
from vistune.demo.pipeline import CONFIG_DIR as DEMO_CONFIGS
from vistune.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))  # the run presets; the demo's alternatives ship in the package
PRESETS = RECIPES + sorted(DEMO_CONFIGS.glob("*.yaml"))

# LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", 2023, Table 9; the authors'
# scripts/v1_5/pretrain.sh and finetune.sh): what each stage's fields must resolve to.
PUBLISHED = {
    "align": {"lr": 1e-3, "global_batch_size": 256, "epochs": 1, "warmup_ratio": 0.03, "lr_schedule": "cosine",
              "weight_decay": 0.0, "model_max_length": 2048, "format": "plain", "precision": "bf16",
              "gradient_checkpointing": True, "parts": ("frozen", "full", "frozen")},
    "finetune": {"lr": 2e-5, "global_batch_size": 128, "epochs": 1, "warmup_ratio": 0.03, "lr_schedule": "cosine",
                 "weight_decay": 0.0, "model_max_length": 2048, "format": "vicuna_v1", "precision": "bf16",
                 "gradient_checkpointing": True, "parts": ("frozen", "full", "full")},
}
# finetune_lora.sh: the LLM through LoRA (r 128, alpha 256, dropout 0.05, every linear layer) at lr 2e-4, the
# projector fully at 2e-5.
PUBLISHED_LORA = {**PUBLISHED["finetune"], "lr": 2e-4, "projector_lr": 2e-5, "parts": ("frozen", "full", "lora"),
                  "lora": (128, 256, 0.05, "all-linear")}


def _recipe(stage_name: str, cfg: RunConfig) -> dict:
    """The fields of PUBLISHED as this stage resolves them."""
    stage = cfg.stages[stage_name]
    got = {k: getattr(stage, k) for k in PUBLISHED[stage_name] if k != "parts"}
    got["parts"] = (stage.parts.vision, stage.parts.projector, stage.parts.llm)
    if stage.parts.llm == "lora":
        got["projector_lr"] = stage.projector_lr
        got["lora"] = (stage.lora.r, stage.lora.alpha, stage.lora.dropout, stage.lora.target_modules)
    return got


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name if p.parent == CONFIGS else f"demo/{p.name}")
def test_every_preset_trains_its_llm_from_a_projector_that_fits(path: Path) -> None:
    """A stage that trains the LLM starts from a trained projector: an earlier stage's, or one a recipe
    preset writes for the same vision tower, projector and LLM (else the weights would not load, or the LLM
    would learn from a random projector)."""
    cfg = load_config(path).resolved()
    written = {stage.output_dir: load_config(other).model for other in RECIPES
               for stage in load_config(other).stages.values()}
    earlier: set[str] = set()
    for name, stage in cfg.stages.items():
        if stage.parts.llm != "frozen":
            assert stage.projector_from, f"{path.name}: stage {name} trains the LLM from a random projector"
            assert stage.projector_from in earlier or written.get(stage.projector_from) == cfg.model, \
                f"{path.name}: stage {name}'s projector_from {stage.projector_from} is no earlier stage's output " \
                "and no recipe's for this model"
        earlier.add(stage.output_dir)


def test_recipes_sharing_a_folder_configure_the_same_stage() -> None:
    """A finished stage is skipped on a rerun, so two recipes that write one folder (7b-lora reuses 7b's
    align) must configure the same model and stage, or the second would silently reuse the first's output."""
    owners: dict[str, tuple[str, dict]] = {}
    shared = 0
    for path in RECIPES:
        cfg = load_config(path).resolved()
        for name, stage in cfg.stages.items():
            what = {"model": cfg.model.model_dump(), "stage": stage.model_dump()}
            if stage.output_dir in owners:
                first, expected = owners[stage.output_dir]
                assert what == expected, f"{path.name} and {first} both write {stage.output_dir}, configured apart"
                shared += 1
            owners.setdefault(stage.output_dir, (path.name, what))
    assert shared >= 1  # the check above ran on at least one shared folder


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b", "llava-1.5-7b-lora"])
def test_llava_15_published_hyperparameters(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert list(cfg.stages) == ["align", "finetune"]
    assert _recipe("align", cfg) == PUBLISHED["align"]
    assert _recipe("finetune", cfg) == (PUBLISHED_LORA if name.endswith("lora") else PUBLISHED["finetune"])
    assert (cfg.model.projector, cfg.model.vision.select_layer, cfg.model.vision.select_feature) == ("mlp2x_gelu", -2, "patch")
    size = name.split("-")[2]  # 7b / 13b
    assert Path(cfg.model.vision.path).name == "clip-vit-large-patch14-336"
    assert Path(cfg.model.llm.path).name == f"vicuna-{size}-v1.5"
    assert cfg.resolved().stages["finetune"].projector_from == cfg.stages["align"].output_dir


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
