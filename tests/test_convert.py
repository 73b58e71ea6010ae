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
from vistune.convert.weights import load_weight_file
from vistune.errors import CheckpointError
from vistune.infer.engine import Engine
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, load_checkpoint, save_checkpoint
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
    return engine._batch([[Message("user", QUESTION)]], [[image]])


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


@pytest.mark.parametrize("fmt", ["vicuna_v1", "llama_2", "plain", "chat_template"])
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

    new = engine.model.generate(**batch, **engine._generate_kwargs(engine_sampling()))[0]
    with torch.no_grad():
        hf_new = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert new.tolist() == hf_new.tolist()
    assert engine.tokenizer.decode(new, skip_special_tokens=True).strip().startswith("The")


def engine_sampling():  # noqa: ANN201
    from vistune.infer.engine import Sampling

    return Sampling(max_new_tokens=12)


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
