"""The Hugging Face `llava-hf` format: `LlavaForConditionalGeneration` + `LlavaProcessor`.

Writing follows transformers' own conversion (convert_llava_weights_to_hf.py): the `<image>` token is
added to the tokenizer as a special token and the embedding and LM head get a row for it. The new
rows are the mean of the existing ones (the input row is never used: image features replace it),
and the exported generation config suppresses the token, so HF never generates the placeholder
and its greedy output equals vistune's. What HF's format cannot hold (the conversation format, the
text vocabulary size before the image row) goes in `vistune_export.json`, which HF ignores and the
reader uses to restore the model exactly.

HF's projector is always `linear_1 -> act -> linear_2`: only vistune's `mlp2x_gelu` maps onto it.

An `anyres` model is written as `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` (format
`llava-next`, `image_newline` included, the effective grid pinpoints in config and processor); a
`single` model as `LlavaForConditionalGeneration`. `hd` has no transformers class.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from jinja2 import TemplateError
from transformers import (
    AddedToken,
    AutoImageProcessor,
    AutoProcessor,
    BaseImageProcessor,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import IMAGE_PLACEHOLDER, check_format_key, get_format
from vistune.config import LLMConfig, VisionConfig
from vistune.convert.assemble import assemble, causal_lm_from_state
from vistune.convert.templates import carry_processor_template, processor_chat_template
from vistune.errors import CheckpointError
from vistune.files import replacing_folder
from vistune.images import carried_fields
from vistune.model.checkpoint import Bundle
from vistune.model.llm import load_tokenizer
from vistune.model.tiling import anyres_processor

EXPORT_FILE = "vistune_export.json"
HF_PROJECTOR = "mlp2x_gelu"


def _select_strategy(select_feature: str, has_cls: bool) -> str:
    # HF's "default" drops the first token (CLS); "full" keeps every token.
    return "default" if select_feature == "patch" and has_cls else "full"


def _check_exportable(bundle: Bundle) -> None:
    spec, model = bundle.spec, bundle.model
    if spec.projector != HF_PROJECTOR:
        raise CheckpointError(
            f"projector {spec.projector!r} cannot be written as llava-hf: LlavaMultiModalProjector is always two "
            f"linear layers with an activation between them, which only vistune's {HF_PROJECTOR!r} matches; keep "
            "this model in the vistune format")
    if any(not isinstance(m, nn.Linear) or m.bias is None for m in (model.projector[0], model.projector[2])):
        raise CheckpointError("the projector's linear layers must have biases to be written as llava-hf")
    if hasattr(model.llm, "peft_config"):
        raise CheckpointError("the LLM carries a LoRA adapter; merge it first (vistune merge-lora)")
    if model.layout.mode == "hd":
        raise CheckpointError("image_mode 'hd' (LLaVA-1.5-HD) has no transformers model class; keep this model in "
                              "the vistune format (anyres models convert to llava-next)")


def _pad_processor(source: BaseImageProcessor) -> BaseImageProcessor:
    """LlavaImageProcessor with do_pad: vistune's `pad` (expand to a square of the mean colour, then
    the encoder's processor) done by the HF processor itself."""
    try:  # the PIL backend, as the fixtures and the encoders' processors use (no torchvision needed)
        from transformers import LlavaImageProcessorPil as LlavaImageProcessor
    except ImportError:
        from transformers import LlavaImageProcessor
    return LlavaImageProcessor(**carried_fields(source), do_pad=True)


def write_llava_hf(bundle: Bundle, dst: str | Path) -> Path:
    """Write `bundle` as a llava-hf folder that `LlavaForConditionalGeneration.from_pretrained` (or, for an
    `anyres` model, `LlavaNextForConditionalGeneration`) and `AutoProcessor.from_pretrained` load
    unchanged. The folder appears complete or not at all."""
    _check_exportable(bundle)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; give a new folder")
    tokenizer = copy.deepcopy(bundle.tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    strategy = _select_strategy(bundle.spec.vision.select_feature, bundle.model.vision.has_cls)
    hf, text_vocab = _hf_model(bundle, image_id, strategy)
    hf.generation_config = _generation_config(bundle, tokenizer, image_id)
    processor = _hf_processor(bundle, tokenizer, strategy)
    spec = bundle.spec
    export = {"text_vocab_size": text_vocab, "conversation_format": spec.conversation_format,
              "system_prompt": spec.system_prompt, "model_max_length": spec.model_max_length,
              "image_preprocess": spec.vision.image_preprocess, "select_feature": spec.vision.select_feature,
              "provenance": spec.provenance}
    return _save_folder(dst, hf, processor, export)


def _grown_embeddings(llm: nn.Module, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's input embeddings and LM head [V', D], grown to hold `image_id`: the new rows are the mean of
    the existing ones, as transformers' conversion does."""
    embed = llm.get_input_embeddings().weight.detach()  # [V, D]
    head = llm.get_output_embeddings().weight.detach()  # [V, D]
    grow = max(embed.shape[0], image_id + 1) - embed.shape[0]
    embed = torch.cat([embed, embed.mean(0, keepdim=True).expand(grow, -1)])  # [V', D]
    head = torch.cat([head, head.mean(0, keepdim=True).expand(grow, -1)])  # [V', D]
    return embed, head


def _hf_model(bundle: Bundle, image_id: int, strategy: str) -> tuple[PreTrainedModel, int]:
    """The transformers model holding `bundle`'s weights (in the LLM's dtype), and the text vocabulary size
    before the image row."""
    spec, model = bundle.spec, bundle.model
    encoder, llm, layout = model.vision.encoder, model.llm, model.layout
    anyres = layout.mode == "anyres"
    text_vocab = llm.get_input_embeddings().weight.shape[0]
    embed, head = _grown_embeddings(llm, image_id)
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = embed.shape[0]
    config_class, model_class = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else (
        LlavaConfig, LlavaForConditionalGeneration)
    extra = {"image_grid_pinpoints": [list(p) for p in layout.pinpoints]} if anyres else {}
    config = config_class(
        vision_config=copy.deepcopy(encoder.config), text_config=text_config, image_token_index=image_id,
        image_seq_length=spec.num_image_tokens, projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
        vision_feature_layer=spec.vision.select_layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)), **extra,
    )
    dtype = embed.dtype
    config.dtype = dtype
    # Built on the meta device and filled by assignment: no random init of a multi-billion model.
    with torch.device("meta"):
        hf = model_class(config)
    if anyres:
        hf.model.image_newline = nn.Parameter(model.image_newline.detach().to(dtype).clone())
    decoder_state = {k: v for k, v in getattr(llm, llm.base_model_prefix).state_dict().items()}
    decoder_state["embed_tokens.weight"] = embed
    parts: list[tuple[nn.Module, dict[str, torch.Tensor]]] = [
        (hf.model.vision_tower, encoder.state_dict()),
        (hf.model.multi_modal_projector.linear_1, model.projector[0].state_dict()),
        (hf.model.multi_modal_projector.linear_2, model.projector[2].state_dict()),
        (hf.model.language_model, decoder_state),
        (hf.lm_head, {"weight": head}),
    ]
    for module, state in parts:
        module.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, strict=True,
                               assign=True)
    return hf, text_vocab


def _hf_processor(bundle: Bundle, tokenizer: PreTrainedTokenizerBase,
                  strategy: str) -> LlavaProcessor | LlavaNextProcessor:
    """LlavaProcessor (LlavaNextProcessor for `anyres`) doing what vistune's preprocessing and chat format do."""
    spec, model = bundle.spec, bundle.model
    anyres = model.layout.mode == "anyres"
    if anyres:
        image_processor = anyres_processor(bundle.image_processor, model.layout)
    elif spec.vision.image_preprocess == "pad":
        image_processor = _pad_processor(bundle.image_processor)
    else:
        image_processor = copy.deepcopy(bundle.image_processor)
    return (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=model.vision.encoder.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=processor_chat_template(spec.conversation_format, spec.system_prompt, bundle.tokenizer),
        image_token=IMAGE_PLACEHOLDER, num_additional_image_tokens=int(model.vision.has_cls),
    )


def _generation_config(bundle: Bundle, tokenizer: PreTrainedTokenizerBase, image_id: int) -> GenerationConfig:
    """The LLM's generation config, stopping where vistune's chat format ends a turn and never generating
    the image token (so HF's greedy output equals vistune's)."""
    llm, spec = bundle.model.llm, bundle.spec
    generation = copy.deepcopy(llm.generation_config) if getattr(llm, "generation_config", None) else GenerationConfig()
    stops = ChatEncoder(bundle.tokenizer, get_format(spec.conversation_format, spec.system_prompt),
                        spec.num_image_tokens).stop_token_ids()
    if stops:
        generation.eos_token_id = stops
    generation.pad_token_id = tokenizer.pad_token_id
    generation.suppress_tokens = [image_id]
    return generation


def _save_folder(dst: Path, hf: PreTrainedModel, processor: LlavaProcessor | LlavaNextProcessor,
                 export: dict[str, Any]) -> Path:
    """Model, processor and `EXPORT_FILE` written to `dst` (absent or empty) so that it appears complete or
    not at all."""
    with replacing_folder(dst) as tmp:
        hf.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / EXPORT_FILE).write_text(json.dumps(export, indent=2, default=str))
    return dst


def read_llava_hf(src: str | Path, conversation_format: str | None = None, system_prompt: str | None = None,
                  dtype: torch.dtype | None = None) -> Bundle:
    """A llava-hf folder as a vistune Bundle (in its stored dtype unless `dtype`). The conversation format comes from
    `conversation_format`, else from `vistune_export.json`, else from the folder's processor chat template (see
    `_prompt_format`), else `vicuna_v1`."""
    src = Path(src)
    export: dict[str, Any] = json.loads((src / EXPORT_FILE).read_text()) if (src / EXPORT_FILE).is_file() else {}
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    model_class = LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration
    hf = model_class.from_pretrained(str(src), dtype=dtype or "auto")
    config = hf.config
    encoder = hf.model.vision_tower
    feature = _select_feature(src, config, encoder)
    llm = _text_llm(hf, int(export.get("text_vocab_size", config.text_config.vocab_size)), src)

    processor = AutoImageProcessor.from_pretrained(str(src))
    preprocess = export.get("image_preprocess") or ("pad" if getattr(processor, "do_pad", False) else "processor")
    if getattr(processor, "do_pad", False):
        # vistune pads before calling the processor (model/vision.py); the processor must not pad again.
        processor.do_pad = False
    tokenizer = load_tokenizer(src)
    fmt = _prompt_format(src, tokenizer, conversation_format, export)
    projector_state = {"0.weight": hf.model.multi_modal_projector.linear_1.weight,
                       "0.bias": hf.model.multi_modal_projector.linear_1.bias,
                       "2.weight": hf.model.multi_modal_projector.linear_2.weight,
                       "2.bias": hf.model.multi_modal_projector.linear_2.bias}
    anyres = {}
    if model_type == "llava_next":
        # LLaVA-NeXT: anyres with the model's pinpoints; its newline travels with the projector weights.
        anyres = {"image_mode": "anyres", "image_grid_pinpoints": [tuple(p) for p in config.image_grid_pinpoints]}
        projector_state["image_newline"] = hf.model.image_newline
    vision = VisionConfig(path=str(src), select_layer=config.vision_feature_layer, select_feature=feature,
                          image_preprocess=preprocess, **anyres)
    return assemble(
        encoder, vision, HF_PROJECTOR, {k: v.detach() for k, v in projector_state.items()}, llm,
        LLMConfig(path=str(src)), tokenizer, processor, fmt,
        system_prompt if system_prompt is not None else export.get("system_prompt"),
        int(export.get("model_max_length") or getattr(llm.config, "max_position_embeddings", 2048)),
        {"converted_from": str(src.resolve()), "source_format": "llava-next" if anyres else "llava-hf"}, src,
    )


def _select_feature(src: Path, config: Any, encoder: nn.Module) -> str:
    """vistune's `select_feature` for a llava-hf config, after checking its projector and feature layer map
    onto vistune's."""
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise CheckpointError(f"{src}: projector act {config.projector_hidden_act!r} (bias "
                              f"{config.multimodal_projector_bias}) has no vistune projector; only gelu with biases "
                              f"({HF_PROJECTOR}) does")
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointError(f"{src}: vision_feature_layer {config.vision_feature_layer} concatenates several "
                              "layers, which vistune's vision tower does not do")
    has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in encoder.modules())
    if config.vision_feature_select_strategy == "default":
        if not has_cls:
            raise CheckpointError(f"{src}: strategy 'default' drops the first token of an encoder without a CLS "
                                  "token; vistune selects patches by what the encoder has")
        return "patch"
    return "cls_patch" if has_cls else "patch"


def _text_llm(hf: PreTrainedModel, n_text: int, src: Path) -> PreTrainedModel:
    """The causal LM inside a llava-hf model, cut back to its `n_text` text rows (the image row removed)."""
    text_config = copy.deepcopy(hf.config.text_config)
    text_config.vocab_size = n_text
    decoder = hf.model.language_model
    state = {f"{_prefix(text_config)}.{k}": v for k, v in decoder.state_dict().items()}
    embed_key = f"{_prefix(text_config)}.embed_tokens.weight"
    state[embed_key] = state[embed_key][:n_text]
    if not text_config.tie_word_embeddings:
        state["lm_head.weight"] = hf.lm_head.weight.detach()[:n_text]
    llm = causal_lm_from_state(text_config, state, str(src))
    llm.generation_config = copy.deepcopy(hf.generation_config)
    llm.generation_config.suppress_tokens = None
    return llm


def _prompt_format(src: Path, tokenizer: PreTrainedTokenizerBase, conversation_format: str | None,
                   export: dict[str, Any]) -> str:
    """The conversation format of a llava-hf folder: the one asked for, else the one a vistune export
    recorded, else the folder's own processor chat template, carried into `tokenizer` (format
    `hf_processor`), so vistune prompts the model exactly as transformers does; `vicuna_v1` only when the
    folder has no template at all."""
    if conversation_format or export.get("conversation_format"):
        return check_format_key(conversation_format or export["conversation_format"])
    try:
        processor = AutoProcessor.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: its processor could not be loaded ({e}); pass --format to choose the "
                              "conversation format yourself") from None
    template = getattr(processor, "chat_template", None)
    if not isinstance(template, str) or not template:
        return "vicuna_v1"
    try:
        probe = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                                              add_generation_prompt=True)
    except TemplateError as e:
        raise CheckpointError(f"{src}: its processor chat template does not render a one-question conversation "
                              f"({e}); pass --format to choose the conversation format yourself") from None
    tokenizer.chat_template = carry_processor_template(template)
    if tokenizer.bos_token and probe.startswith(tokenizer.bos_token):
        # The template writes BOS itself, so the processor adds none: the tokenizer's template format does the same.
        return "chat_template"
    return "hf_processor"


def _prefix(text_config: Any) -> str:
    """The attribute holding the decoder in the text model's *ForCausalLM class (`model` for Llama, Qwen2, ...)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(text_config)]
    return cls.base_model_prefix
