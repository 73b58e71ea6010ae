"""The one config system: validated pydantic models, YAML presets, and `a.b.c=value` overrides.

A run config names the model's parts (`model`) and an ordered mapping of stages (`stages`). A stage
is data: which parts train and how (`parts: {vision: frozen, projector: full, llm: lora}`), its data,
its hyperparameters and its output folder. Stage 2 takes stage 1's projector by an explicit path
(`projector_from`), never by guessing from folder names.

Every model forbids unknown fields, so a typo such as `stages.align.lrr` fails before any work starts
with the field's full path and the valid names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from vistune.chat.formats import check_format_key
from vistune.errors import ConfigError
from vistune.registry_keys import check_projector_key, check_trackers
from vistune.strict import Strict, explain, registry_key

PartMode = Literal["frozen", "full", "lora"]


class VisionConfig(Strict):
    """The vision tower: any Hugging Face vision encoder folder (CLIP, SigLIP, ...); always frozen."""

    path: str = Field(description="Local folder of a HF vision model (a full CLIP/SigLIP folder is fine).")
    select_layer: int = Field(-2, description="Hidden layer whose features are used; -2 is the penultimate (LLaVA).")
    select_feature: Literal["patch", "cls_patch"] = Field(
        "patch", description="`patch`: patch tokens only (LLaVA); `cls_patch`: keep the CLS token too."
    )
    image_preprocess: Literal["pad", "processor"] = Field(
        "pad",
        description="`pad`: expand to a square filled with the processor's mean colour, then the processor "
        "(LLaVA-1.5); `processor`: the processor's own resize/crop.",
    )
    image_mode: Literal["single", "hd", "anyres"] = Field(
        "single", description="`single`: one encoder-sized image (LLaVA-1.5); `hd`: a fixed grid of encoder-sized "
        "tiles merged into one map plus the downsampled whole image (LLaVA-1.5-HD); `anyres`: the grid chosen per "
        "image among `image_grid_pinpoints`, unpadded, with a learned row-end embedding (LLaVA-NeXT)."
    )
    hd_grid: tuple[int, int] = Field((2, 2), description="`hd`: tiles as [rows, cols].")
    image_grid_pinpoints: list[tuple[int, int]] | None = Field(
        None, description="`anyres`: candidate resolutions [height, width] in pixels, multiples of the encoder's "
        "input size; default LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3 tiles."
    )
    max_tiles: int | None = Field(None, gt=0, description="`anyres`: drop pinpoints with more tiles than this.")

    @field_validator("hd_grid")
    @classmethod
    def _grid(cls, grid: tuple[int, int]) -> tuple[int, int]:
        if min(grid) < 1:
            raise ValueError(f"hd_grid {list(grid)} needs at least one row and one column")
        return grid


class LLMConfig(Strict):
    """The language model: any Hugging Face causal LM folder, or a GGUF file inside one."""

    path: str = Field(description="Local folder of a HF causal LM (weights and tokenizer).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`; transformers dequantizes it.")
    attn_implementation: str | None = Field(
        "sdpa", description="Passed to transformers (`eager`, `sdpa`, `flash_attention_2`, ...)."
    )


class ModelConfig(Strict):
    """The three parts of a LLaVA model."""

    vision: VisionConfig
    llm: LLMConfig
    projector: str = Field("mlp2x_gelu", description="Projector key: `linear`, `identity` or `mlp{N}x_gelu`.")

    @field_validator("projector")
    @classmethod
    def _projector_key(cls, key: str) -> str:
        return registry_key(check_projector_key, key)


class PartsConfig(Strict):
    """What trains in a stage. The vision tower is always frozen (as in LLaVA)."""

    vision: Literal["frozen"] = "frozen"
    projector: Literal["frozen", "full"] = "full"
    llm: PartMode = "frozen"


class LoraSettings(Strict):
    """LoRA settings (peft), used where a part is `lora`. Defaults are LLaVA-1.5's finetune_lora."""

    r: int = Field(128, gt=0)
    alpha: int = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field("all-linear", description="peft target_modules; `all-linear` skips lm_head.")


class DataConfig(Strict):
    """A LLaVA JSON/JSONL file and its image folder."""

    path: str = Field(description="LLaVA-format .json (a list) or .jsonl (one record per line).")
    image_folder: str | None = Field(None, description="Folder that `image` fields are relative to.")
    on_bad_sample: Literal["error", "skip"] = Field(
        "error", description="`error`: stop naming the record; `skip`: drop it, count it, report at the end."
    )
    group_by_modality_length: bool = Field(
        True, description="Batch samples of similar length, image and text-only samples apart (LLaVA)."
    )
    image_placement: Literal["front", "keep"] = Field(
        "front", description="`front`: a turn with one `<image>` has it moved to the front (`<image>\\n` + text), as "
        "LLaVA-1.5's preprocess_multimodal does, so training matches evaluation prompts; turns with several "
        "images keep their order. `keep`: placeholders stay where the data puts them."
    )
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes per training process (also used by the precheck). "
        "None: on CUDA, the CPU cores per process minus one, at most 8, so JPEG decoding, resizing and tokenizing "
        "keep up with the GPU; on CPU-only runs 0 (the cores are busy computing)."
    )
    precheck: bool = Field(
        True, description="Tokenize every sample before training: labels checked and exact lengths, so a bad "
        "sample stops the run at its start, not hours in (about 1-2 ms per sample per process)."
    )
    packing: bool = Field(
        False, description="Pack several samples into each row (images with their text); attention never crosses "
        "a sample and the loss per token is unchanged. Batch sizes then count packed rows, not samples."
    )
    pack_length: int | None = Field(
        None, gt=0, description="Tokens per packed row (image tokens included); defaults to model_max_length."
    )
    on_truncated: Literal["keep", "drop"] = Field(
        "keep", description="Samples that lose some reply tokens to model_max_length (not all: those are always "
        "dropped): `keep` trains on what fits, `drop` leaves them out. Either way they are counted and listed in "
        "OUTPUT_DIR/truncated.json."
    )
    verify_images: bool = Field(
        False, description="Decode every image in the precheck (about one image decode per image), so a corrupt "
        "file stops the run (or is skipped, counted once) before training rather than at the step that loads it."
    )
    val_path: str | None = Field(
        None, description="Held-out LLaVA-format file (images under `image_folder`); its loss is logged every "
        "`val_every` steps."
    )
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of `path` (drawn with the stage's seed) as the "
        "validation set instead of `val_path`."
    )

    @model_validator(mode="after")
    def _one_val_source(self) -> DataConfig:
        if self.val_path is not None and self.val_fraction is not None:
            raise ValueError("give data.val_path or data.val_fraction, not both")
        if self.on_truncated == "drop" and not self.precheck:
            raise ValueError("data.on_truncated=drop needs data.precheck=true (the precheck finds those samples)")
        return self


# Hugging Face Trainer / LLaVA TrainingArguments names that people type into a stage, with the vistune
# field for each. Deliberately hints, not aliases: two names for one field is two ways to do one thing,
# and the batch names do not map one to one (vistune's batch is global: the accumulation steps follow
# from it, the processes and the micro batch, so a run keeps its batch when the GPU count changes).
_HF_STAGE_NAMES = {
    "learning_rate": "did you mean 'lr'?",
    "num_train_epochs": "did you mean 'epochs'?",
    "per_device_train_batch_size": "did you mean 'micro_batch_size' (samples per forward pass per process)? "
                                   "vistune also needs 'global_batch_size' (samples per optimizer step over all "
                                   "processes)",
    "gradient_accumulation_steps": "vistune derives it: set 'global_batch_size' = per_device_train_batch_size x "
                                   "gradient_accumulation_steps x processes, and 'micro_batch_size' = "
                                   "per_device_train_batch_size",
    "lr_scheduler_type": "did you mean 'lr_schedule'?",
    "warmup_steps": "vistune takes 'warmup_ratio' (a fraction of the steps)",
    "save_steps": "did you mean 'save_every'?",
    "save_total_limit": "did you mean 'keep_checkpoints'?",
    "logging_steps": "did you mean 'log_every'?",
    "bf16": "did you mean 'precision: bf16'?",
    "mm_projector_lr": "did you mean 'projector_lr'?",
}


class StageConfig(Strict):
    """One training stage: what trains, on what, how, and where it is saved."""

    unknown_field_hints: ClassVar[dict[str, str]] = _HF_STAGE_NAMES
    parts: PartsConfig = Field(default_factory=PartsConfig)
    projector_from: str | None = Field(
        None, description="The name of an earlier stage of this run (e.g. `align`: its output_dir, overrides "
        "included) or a vistune checkpoint folder, whose projector starts this stage."
    )
    data: DataConfig
    format: str = Field("vicuna_v1", description="Conversation format: plain, vicuna_v1, llava_v1, llama_2, "
                        "chat_template, hf_processor (a converted llava-hf folder's own template).")
    system_prompt: str | None = Field(None, description="Overrides the format's default system prompt.")
    model_max_length: int = Field(2048, gt=0, description="Tokens per sample, image tokens included.")
    image_preprocess: Literal["pad", "processor"] | None = Field(
        None, description="This stage's image preprocessing; None: the model's `vision.image_preprocess`. "
        "LLaVA-1.5 aligns with `processor` (resize + centre crop; pretrain.sh sets no image_aspect_ratio, i.e. "
        "`square`) and finetunes with `pad`. The saved model records what its last stage used."
    )
    output_dir: str = Field(description="Where the final checkpoint folder and resume checkpoints go.")

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides `epochs` when set.")
    global_batch_size: int = Field(gt=0, description="Samples per optimizer step over all processes.")
    micro_batch_size: int = Field(gt=0, description="Samples per forward pass per process.")
    lr: float = Field(gt=0)
    projector_lr: float | None = Field(None, gt=0, description="Projector learning rate; defaults to `lr`.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)
    distributed: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        "ddp", description="Engine when launched on several processes (accelerate launch / torchrun): torch DDP, "
        "FSDP (accelerate's FullyShardedDataParallelPlugin), or DeepSpeed ZeRO-2/3 (DeepSpeedPlugin; LLaVA used "
        "ZeRO-2 to align and ZeRO-3 to finetune). Ignored on one process."
    )
    loss_chunk_size: int | None = Field(
        None, gt=0, description="Compute the LM head and cross-entropy this many tokens at a time, never holding "
        "the full [tokens, vocab] logits (large vocabularies); None: the LLM's own loss."
    )
    compile: bool = Field(False, description="torch.compile each LLM decoder layer (not yet measured on a GPU to pay).")
    tf32: bool = Field(
        True, description="On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (LLaVA's --tf32 True); "
        "no effect elsewhere. false keeps full float32 precision."
    )

    seed: int = 42
    log_every: int = Field(1, gt=0)
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers, through accelerate's tracker API as in the "
        "HF Trainer: tensorboard (default, in OUTPUT_DIR/tensorboard), wandb, mlflow, comet_ml, aim, clearml, "
        "dvclive, swanlab, trackio; [] or none for metrics.jsonl only."
    )
    val_every: int = Field(100, gt=0, description="Validation loss every N optimizer steps (and after the last), "
                           "when the stage has a held-out set (data.val_path / data.val_fraction).")
    save_every: int | None = Field(None, gt=0, description="Write a resume checkpoint every N optimizer steps.")
    save_every_minutes: float | None = Field(
        30.0, gt=0, description="Also write a resume checkpoint when this many minutes passed since the last one, "
        "bounding the work a crash can lose (None: only save_every). SIGTERM, SIGUSR1 and Ctrl-C always save "
        "at the next step boundary."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Resume checkpoints kept (oldest deleted).")
    resume: bool = Field(True, description="Continue from the newest resume checkpoint in output_dir, if any.")
    stop_after_steps: int | None = Field(
        None, gt=0, description="End this invocation after this step (checkpoint written), e.g. to fit a cluster "
        "time slot; running again resumes."
    )
    save_frozen: bool = Field(
        True, description="Copy frozen parts into the output folder (portable). False records their source path, "
        "as LLaVA's projector-only stage-1 output does. A LoRA LLM's base is never copied: the folder holds the "
        "adapter and the base's path (`vistune merge-lora` makes a standalone folder)."
    )

    @field_validator("format")
    @classmethod
    def _format_key(cls, key: str) -> str:
        return registry_key(check_format_key, key)

    @model_validator(mode="before")
    @classmethod
    def _old_tensorboard_key(cls, data: Any) -> Any:
        """`tensorboard: false` (the spelling before `report_to`) still means no tracker."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            data.setdefault("report_to", ["tensorboard"] if on else [])
        return data

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        return registry_key(check_trackers, value)

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}"
            )
        if self.data.packing and self.data.pack_length is not None and self.data.pack_length < self.model_max_length:
            raise ValueError(
                f"data.pack_length {self.data.pack_length} is shorter than model_max_length {self.model_max_length}: "
                "a full-length sample would not fit in a row; raise pack_length or leave it unset"
            )
        return self


class RunConfig(Strict):
    """A whole run: the model's parts and the stages, trained in order."""

    model: ModelConfig
    stages: dict[str, StageConfig] = Field(description="Stage name -> stage, run in the order written.")
    collective_timeout_minutes: int = Field(
        120, gt=0, description="How long a process waits in a collective (barrier, all-reduce) before the launch "
        "fails. Generous, because the other processes wait at a barrier while the first writes a checkpoint (tens "
        "of GB at 7B; torch's own default is 10 minutes)."
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not self.stages:
            raise ValueError("`stages` is empty: give at least one stage")
        names = list(self.stages)
        for i, (name, stage) in enumerate(self.stages.items()):
            ref = stage.projector_from
            if ref in self.stages and ref not in names[:i]:
                raise ValueError(f"stages.{name}.projector_from names stage {ref!r}, which does not run before it; "
                                 f"earlier stages: {names[:i] or 'none'}")
        return self

    def resolved(self) -> RunConfig:
        """A copy where `projector_from: <stage name>` is that stage's output_dir (the path overrides gave it)."""
        stages = {name: stage.model_copy(update={"projector_from": self.stages[stage.projector_from].output_dir})
                  if stage.projector_from in self.stages else stage for name, stage in self.stages.items()}
        return self.model_copy(update={"stages": stages})


def stage_image_preprocess(model: ModelConfig, stage: StageConfig) -> Literal["pad", "processor"]:
    """The image preprocessing `stage` trains with: its own, else the model's."""
    return stage.image_preprocess or model.vision.image_preprocess


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`stages.align.lr=1e-3` -> ("stages.align.lr", 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key.path=value` overrides, validate, resolve stage references
    (`projector_from: align`). Paths stay as written."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with `model` and `stages`")
        tree = loaded
    if data is not None:
        tree = data
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(explain(e, source, RunConfig)) from None
    return cfg.resolved()  # `projector_from: <stage>` -> that stage's output_dir, after the overrides
