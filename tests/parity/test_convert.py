"""Checkpoint interop: original LLaVA and llava-hf in, llava-hf out, LoRA merged, numbers equal.

Parity is checked against transformers' own `LlavaForConditionalGeneration` and `LlavaProcessor`
loading the converted folder unchanged; original-LLaVA folders are written here from the
repository's documented key names and config fields.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from vistune.chat.formats import Message, get_format
from vistune.cli import main
from vistune.config import LLMConfig, VisionConfig
from vistune.convert.detect import detect
from vistune.convert.llava_hf import write_llava_hf
from vistune.convert.templates import processor_chat_template
from vistune.errors import CheckpointError
from vistune.infer.engine import Engine, Job, Sampling
from vistune.model.checkpoint import (
    Bundle,
    ModelSpec,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.model.vlm import IMAGE_TOKEN_ID

QUESTION = "What colour is the shape?"


def _random_bundle(vision_dir: Path, llm_dir: Path, fmt: str = "chat_template", projector: str = "mlp2x_gelu",
                   feature: str = "patch", preprocess: str = "pad", seed: int = 0) -> Bundle:
    vision = VisionConfig(path=str(vision_dir), select_feature=feature, image_preprocess=preprocess)
    llm = LLMConfig(path=str(llm_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(vision, llm, projector).eval()
    spec = ModelSpec(vision=vision, llm=llm, projector=projector, vision_hidden_size=model.vision.hidden_size,
                     llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
                     num_image_tokens=model.num_image_tokens, conversation_format=fmt, model_max_length=256)
    return Bundle(model, load_tokenizer(llm_dir), load_image_processor(vision_dir), spec)


def _inputs(engine: Engine, image: Image.Image) -> dict[str, torch.Tensor | None]:
    return engine.inputs([engine.prepare([Message("user", QUESTION)], [image])])


def _logits(engine: Engine, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(**batch).logits  # [1, L, V]


def _hf_inputs(hf_dir: Path, image: Image.Image) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt")


def _wide_image(dataset_dir: Path) -> Image.Image:
    image = Image.open(dataset_dir / "images" / "img_0.png").convert("RGB")
    assert image.size[0] != image.size[1]  # pad and the processor's crop must give different pixels
    return image


# ---------------------------------------------------------------------------------------------- templates

def _as_parts(content: str) -> str | list[dict[str, str]]:
    if content.startswith("<image>\n"):
        return [{"type": "image"}, {"type": "text", "text": content.removeprefix("<image>\n")}]
    return content


@pytest.mark.parametrize("fmt", ["vicuna_v1", "llava_v1", "llama_2", "plain", "chat_template"])
def test_processor_template_renders_like_the_format(fmt: str, bpe_tokenizer: Path, spm_tokenizer: Path) -> None:
    conversations = [
        [Message("user", f"<image>\n{QUESTION}")],
        [Message("user", f"<image>\n{QUESTION}"), Message("assistant", "Red."), Message("user", "And the rest?")],
        [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello.")],
    ]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    checked = 0
    for tok_dir in (bpe_tokenizer, spm_tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        if fmt == "chat_template" and not tokenizer.chat_template:
            continue
        for system in (None, "Custom system."):
            template = env.from_string(processor_chat_template(fmt, system, tokenizer))
            for conv in conversations:
                if fmt == "plain" and len(conv) > 2:
                    continue
                for gen in (True, False):
                    want = "".join(s.text for s in get_format(fmt, system).render(conv, tokenizer, gen))
                    got = template.render(messages=[{"role": m.role, "content": _as_parts(m.content)} for m in conv],
                                          add_generation_prompt=gen)
                    assert got == want, (fmt, system, gen)
                    checked += 1
    assert checked >= 8


# ---------------------------------------------------------------------------------------------- llava-hf

@pytest.mark.parametrize("preprocess", ["pad", "processor"])
def test_llava_hf_parity(preprocess: str, tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """The trained tiny model and its llava-hf export in transformers: same ids, pixels, logits, greedy text."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    spec = json.loads((src / "vistune.json").read_text())
    spec["vision"]["image_preprocess"] = preprocess  # same weights, the other preprocessing
    (src / "vistune.json").write_text(json.dumps(spec))
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "llava-hf"]) == 0

    image = _wide_image(dataset_dir)
    engine = Engine(load_checkpoint(src))
    batch = _inputs(engine, image)
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    inputs = _hf_inputs(tmp_path / "hf", image)
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id)
    assert torch.equal(ids, inputs["input_ids"])
    assert torch.equal(batch["pixel_values"], inputs["pixel_values"])
    ours = _logits(engine, batch)
    with torch.no_grad():
        theirs = hf(**inputs).logits  # [1, L, V + 1]: one more column, the image token's
    assert theirs.shape[-1] == ours.shape[-1] + 1
    assert (ours - theirs[..., : ours.shape[-1]]).abs().max() < 1e-5

    new = engine.model.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=engine.tokenizer.eos_token_id,
                                pad_token_id=engine.tokenizer.pad_token_id)[0]
    with torch.no_grad():
        hf_new = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert new.tolist() == hf_new.tolist()
    # ...and the engine (what chat, eval and serve use) replies with the same text.
    reply = engine.run([Job(engine.prepare([Message("user", QUESTION)], [image]),
                            Sampling(max_new_tokens=12))])[0].text
    assert reply.strip() == engine.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert reply.strip().startswith("The")


def test_pad_and_processor_pixels_differ(tiny_checkpoint: Path, dataset_dir: Path, tmp_path: Path) -> None:
    """So that the two parity cases above test two different preprocessings."""
    from vistune.model.vision import preprocess_images

    processor = load_image_processor(tiny_checkpoint / "image_processor")
    image = _wide_image(dataset_dir)
    assert not torch.equal(preprocess_images([image], processor, "pad"), preprocess_images([image], processor, "processor"))


def test_round_trip_vistune_llava_hf_vistune(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "hf"), "--to", "llava-hf"]) == 0
    assert detect(tmp_path / "hf").format == "llava-hf"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "vistune"]) == 0
    a, b = load_checkpoint(tiny_checkpoint), load_checkpoint(tmp_path / "back")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for field in ("projector", "num_image_tokens", "conversation_format", "system_prompt", "model_max_length"):
        assert getattr(a.spec, field) == getattr(b.spec, field)
    assert a.spec.vision.model_dump(exclude={"path"}) == b.spec.vision.model_dump(exclude={"path"})


@pytest.mark.parametrize("tower,feature", [("siglip", "patch"), ("clip", "cls_patch")])
def test_llava_hf_feature_selection(tower: str, feature: str, siglip_dir: Path, clip_dir: Path, llama_dir: Path,
                                    dataset_dir: Path, tmp_path: Path) -> None:
    """SigLIP (no CLS) and CLIP with its CLS kept map onto HF's `full` strategy with the right token count."""
    bundle = _random_bundle(siglip_dir if tower == "siglip" else clip_dir, llama_dir, feature=feature)
    write_llava_hf(bundle, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vision_feature_select_strategy == "full"
    engine = Engine(bundle)
    image = _wide_image(dataset_dir)
    batch = _inputs(engine, image)
    inputs = _hf_inputs(tmp_path / "hf", image)
    assert int((inputs["input_ids"] == hf.config.image_token_id).sum()) == bundle.spec.num_image_tokens
    with torch.no_grad():
        theirs = hf(**inputs).logits
    ours = _logits(engine, batch)
    assert (ours - theirs[..., : ours.shape[-1]]).abs().max() < 1e-5


def test_linear_projector_is_refused(clip_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'linear' cannot be written as llava-hf"):
        write_llava_hf(_random_bundle(clip_dir, llama_dir, projector="linear"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------- original LLaVA

def _llava_config(bundle: Bundle, vision_tower: str) -> dict:
    """config.json as LLaVA's train.py leaves it: the LLM's config plus the multimodal fields."""
    config = bundle.model.llm.config.to_dict()
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": vision_tower, "mm_hidden_size": bundle.model.vision.hidden_size,
        "mm_projector_type": bundle.spec.projector, "mm_vision_select_layer": bundle.spec.vision.select_layer,
        "mm_vision_select_feature": bundle.spec.vision.select_feature, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": bundle.spec.model_max_length,
        "tokenizer_padding_side": "right", "use_mm_proj": True,
    })
    return config


def _write_llava_full(bundle: Bundle, out: Path, sharded_bin: bool) -> None:
    """A LlavaLlamaForCausalLM folder: LLM keys as-is, `model.mm_projector.{0,2}.*`, and (in the .bin
    layout, as transformers' conversion script expects) `model.vision_tower.vision_tower.*`."""
    out.mkdir()
    model = bundle.model
    state = {k: v.clone() for k, v in model.llm.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v.clone() for k, v in model.projector.state_dict().items()}
    if sharded_bin:
        state |= {f"model.vision_tower.vision_tower.{k}": v.clone() for k, v in model.vision.encoder.state_dict().items()}
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, out / file)
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(_llava_config(bundle, "openai/clip-vit-large-patch14-336")))
    bundle.tokenizer.save_pretrained(str(out))


@pytest.fixture(scope="module")
def native(clip_dir: Path, llama_spm_dir: Path) -> Bundle:
    """A LLaVA-1.5-shaped model: CLIP, mlp2x_gelu, a Llama tokenizer, vicuna_v1."""
    return _random_bundle(clip_dir, llama_spm_dir, fmt="vicuna_v1", seed=3)


@pytest.mark.parametrize("sharded_bin", [True, False])
def test_original_llava_full_checkpoint(sharded_bin: bool, native: Bundle, clip_dir: Path, dataset_dir: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "llava-v1.5-tiny"
    _write_llava_full(native, src, sharded_bin)
    assert detect(src).format == "llava"
    # The tower is named by hub id: without a local copy the error says which option to give.
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vistune"]) == 2
    assert "pass --vision with a local copy of it" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vistune", "--vision", str(clip_dir)]) == 0
    converted = load_checkpoint(tmp_path / "out")
    assert converted.spec.conversation_format == "vicuna_v1" and converted.spec.vision.image_preprocess == "pad"
    image = _wide_image(dataset_dir)
    ours, theirs = Engine(native), Engine(converted)
    batch = _inputs(ours, image)
    assert torch.equal(batch["input_ids"], _inputs(theirs, image)["input_ids"])
    torch.testing.assert_close(_logits(theirs, batch), _logits(ours, batch), rtol=0, atol=1e-6)
    # ... and straight to llava-hf, as transformers would serve it
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "llava-hf", "--vision", str(clip_dir)]) == 0
    # Token ids: LLaVA tokenizes the text after each image on its own, so a Llama (Metaspace) tokenizer
    # starts it with a lone "▁" piece (the famous id 29871 in LLaVA-1.5); vistune does the same, HF's
    # processor tokenizes the whole prompt and does not. The model is checked on vistune's ids.
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    hf_inputs = _hf_inputs(tmp_path / "hf", image)
    assert torch.equal(hf_inputs["pixel_values"], batch["pixel_values"])
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=hf_inputs["pixel_values"]).logits
    ours_logits = _logits(ours, batch)
    assert (hf_logits[..., : ours_logits.shape[-1]] - ours_logits).abs().max() < 1e-5


def test_original_llava_stage1_projector(native: Bundle, clip_dir: Path, llama_spm_dir: Path, dataset_dir: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "llava-v1.5-tiny-pretrain"
    src.mkdir()
    torch.save({f"model.mm_projector.{k}": v for k, v in native.model.projector.state_dict().items()},
               src / "mm_projector.bin")
    config = _llava_config(native, str(clip_dir)) | {"_name_or_path": "lmsys/vicuna-7b-v1.5"}
    (src / "config.json").write_text(json.dumps(config))
    assert detect(src).format == "llava-projector"
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vistune"]) == 2
    err = capsys.readouterr().err
    assert "'lmsys/vicuna-7b-v1.5'" in err and "--llm" in err
    # the vision tower is a local path in this config, so no --vision is needed
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "vistune", "--llm", str(llama_spm_dir)]) == 0
    converted = Engine(load_checkpoint(tmp_path / "out"))
    batch = _inputs(Engine(native), _wide_image(dataset_dir))
    torch.testing.assert_close(_logits(converted, batch), _logits(Engine(native), batch), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- LoRA

def _with_lora(bundle: Bundle, seed: int = 1) -> Bundle:
    """The bundle's LLM wrapped in a LoRA adapter whose B matrices are non-zero (a fresh adapter is a no-op)."""
    from peft import LoraConfig, get_peft_model

    llm = get_peft_model(bundle.model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    bundle.model.llm = llm.eval()
    return bundle


def test_merge_lora_vistune(clip_dir: Path, llama_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    bundle = _with_lora(_random_bundle(clip_dir, llama_dir))
    src = save_checkpoint(tmp_path / "lora", bundle, bundle.spec.vision, bundle.spec.llm, "lora", save_frozen=True)
    assert load_checkpoint(src).spec.llm_adapter == "llm_adapter"
    assert main(["merge-lora", str(src), str(tmp_path / "merged")]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    assert merged.spec.llm_adapter is None and not hasattr(merged.model.llm, "peft_config")
    adapter = Engine(load_checkpoint(src))
    batch = _inputs(adapter, _wide_image(dataset_dir))
    with_adapter = _logits(adapter, batch)
    torch.testing.assert_close(_logits(Engine(merged), batch), with_adapter, rtol=0, atol=1e-5)
    with adapter.model.llm.disable_adapter():
        assert (_logits(adapter, batch) - with_adapter).abs().max() > 1e-3  # the adapter does change the output


def _write_llava_lora(bundle: Bundle, out: Path, base_name: str) -> None:
    """LLaVA's LoRA output: peft adapter (.bin, as its train.py saves), non_lora_trainables.bin, config.json."""
    from peft import get_peft_model_state_dict

    out.mkdir()
    llm = bundle.model.llm
    llm.peft_config["default"].base_model_name_or_path = base_name
    llm.peft_config["default"].save_pretrained(str(out))
    torch.save(get_peft_model_state_dict(llm, save_embedding_layers=False), out / "adapter_model.bin")
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in bundle.model.projector.state_dict().items()},
               out / "non_lora_trainables.bin")
    config = _llava_config(bundle, "openai/clip-vit-large-patch14-336")
    (out / "config.json").write_text(json.dumps(config))


def test_original_llava_lora(clip_dir: Path, llama_spm_dir: Path, dataset_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _with_lora(_random_bundle(clip_dir, llama_spm_dir, fmt="vicuna_v1", seed=5))
    src = tmp_path / "llava-v1.5-tiny-lora"
    _write_llava_lora(bundle, src, "lmsys/vicuna-7b-v1.5")
    assert detect(src).format == "llava-lora"
    assert main(["convert", str(src), str(tmp_path / "merged"), "--to", "vistune", "--vision", str(clip_dir)]) == 2
    err = capsys.readouterr().err
    assert "needs its base LLM" in err and "'lmsys/vicuna-7b-v1.5'" in err and "--base" in err
    parts = ["--vision", str(clip_dir), "--base", str(llama_spm_dir)]
    assert main(["convert", str(src), str(tmp_path / "merged"), "--to", "vistune", *parts]) == 0
    assert main(["convert", str(src), str(tmp_path / "kept"), "--to", "vistune", "--keep-adapter", *parts]) == 0
    assert load_checkpoint(tmp_path / "kept").spec.llm_adapter == "llm_adapter"

    native = Engine(bundle)  # the adapter model the folder was written from
    batch = _inputs(native, _wide_image(dataset_dir))
    want = _logits(native, batch)
    for out in ("merged", "kept"):
        torch.testing.assert_close(_logits(Engine(load_checkpoint(tmp_path / out)), batch), want, rtol=0, atol=1e-5)
