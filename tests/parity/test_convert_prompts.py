"""Converted models answer exactly as their source (issue 18 item 5).

A llava-hf / llava-next folder as the hub ships it (its own processor chat template, no
`vistune_export.json`) is converted to vistune, answered with vistune's engine and `vistune ask`,
converted back, and answered with transformers: the rendered prompts, token ids, logits (< 1e-5)
and greedy tokens must be those transformers gives on the source folder. The templates below are
written in the style of llava-hf/llava-1.5-7b-hf's and llava-hf/llava-v1.6-mistral-7b-hf's
(images first, then text; no system prompt unless the conversation has a system message).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from vistune.chat.formats import Message
from vistune.cli import main
from vistune.config import LLMConfig, VisionConfig
from vistune.convert.llava_hf import EXPORT_FILE, write_llava_hf
from vistune.infer.engine import Engine
from vistune.model.checkpoint import Bundle, ModelSpec, build_model, load_checkpoint
from vistune.model.llm import load_tokenizer
from vistune.model.vision import load_image_processor
from vistune.model.vlm import IMAGE_TOKEN_ID

# As llava-1.5-*-hf: "USER: <image>\n{text} ASSISTANT:", a system message's text as is, replies without EOS.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# As llava-v1.6-mistral-7b-hf: "[INST] <image>\n{text} [/INST]", replies closed by the EOS token.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + eos_token + ' ' }}{% endif %}{% endfor %}"
)

QUESTION = "What colour is the shape?"
CONVERSATIONS = {
    "single": [Message("user", f"<image>\n{QUESTION}")],
    "system": [Message("system", "Answer with one word."), Message("user", f"<image>\n{QUESTION}")],
    "multi": [Message("user", f"<image>\n{QUESTION}"), Message("assistant", "The shape is red."),
              Message("user", "Where is the shape?")],
    "multi-system": [Message("system", "Answer with one word."), Message("user", f"<image>\n{QUESTION}"),
                     Message("assistant", "The shape is red."), Message("user", "Where is the shape?")],
}
NEW_TOKENS = 8


def _hub_folder(kind: str, clip_dir: Path, llm_dir: Path, out: Path) -> Path:
    """A random tiny llava-hf (`single`, pad) or llava-next (`anyres`) folder laid out as on the hub:
    written by transformers' classes, with the hub-style chat template and no vistune file in it."""
    fields: dict = {"image_preprocess": "pad"} if kind == "llava-hf" else {
        "image_mode": "anyres", "image_grid_pinpoints": [(32, 64), (64, 32), (64, 64)]}
    vision = VisionConfig(path=str(clip_dir), **fields)
    llm = LLMConfig(path=str(llm_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = build_model(vision, llm, "mlp2x_gelu").eval()
    spec = ModelSpec(vision=vision, llm=llm, projector="mlp2x_gelu", vision_hidden_size=model.vision.hidden_size,
                     llm_hidden_size=model.llm.get_input_embeddings().embedding_dim,
                     num_image_tokens=model.num_image_tokens, conversation_format="vicuna_v1", model_max_length=512)
    write_llava_hf(Bundle(model, load_tokenizer(llm_dir), load_image_processor(clip_dir), spec), out)
    (out / EXPORT_FILE).unlink()
    processor = AutoProcessor.from_pretrained(str(out))
    processor.chat_template = LLAVA_15_TEMPLATE if kind == "llava-hf" else LLAVA_NEXT_TEMPLATE
    processor.save_pretrained(str(out))
    generation = json.loads((out / "generation_config.json").read_text())
    generation.pop("suppress_tokens", None)  # hub folders do not suppress the image token
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def _parts(m: Message, image: Image.Image) -> dict:
    content: list[dict] = []
    text = m.content
    while text.startswith("<image>\n"):
        content.append({"type": "image", "image": image})
        text = text.removeprefix("<image>\n")
    return {"role": m.role, "content": [*content, {"type": "text", "text": text}]}


def _image() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (20, 40, 3), generator=g, dtype=torch.uint8).numpy())


def _transformers(folder: Path, conv: list[Message], image: Image.Image) -> tuple[str, dict, torch.Tensor, list[int]]:
    """What a transformers user gets: the rendered prompt, the inputs, the logits at every position, greedy tokens."""
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    cls = LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration
    model = cls.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    messages = [_parts(m, image) for m in conv]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]  # [L, V]
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return prompt, inputs, logits, out[0, inputs["input_ids"].shape[1]:].tolist()


def _vistune(folder: Path, conv: list[Message], image: Image.Image, image_id: int) -> tuple[str, list[int],
                                                                                               torch.Tensor, list[int]]:
    """The same from vistune's engine on the converted folder (ids with HF's image token id in the slots)."""
    engine = Engine(load_checkpoint(folder))
    text = "".join(s.text for s in engine.encoder.format.render(conv, engine.tokenizer, True))
    batch = engine.inputs([engine.prepare(conv, [image])])
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, image_id)[0].tolist()
    with torch.no_grad():
        logits = engine.model(**batch).logits[0]  # [L, V]
        new = engine.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=engine.stop_ids,
                                    pad_token_id=engine.tokenizer.pad_token_id)[0].tolist()
    return text, ids, logits, new


@pytest.fixture(scope="module", params=["llava-hf", "llava-next"])
def folders(request: pytest.FixtureRequest, clip_dir: Path, llama_spm_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """(kind, source, converted to vistune, exported back) for one kind, converted with the CLI."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    src = _hub_folder(kind, clip_dir, llama_spm_dir, root / "src")
    assert main(["convert", str(src), str(root / "vistune"), "--to", "vistune"]) == 0
    assert main(["convert", str(root / "vistune"), str(root / "back"), "--to", kind]) == 0
    return kind, src, root / "vistune", root / "back"


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_converted_and_exported_answer_as_the_source(name: str, folders: tuple[str, Path, Path, Path]) -> None:
    kind, src, converted, back = folders
    conv, image = CONVERSATIONS[name], _image()
    prompt, inputs, logits, tokens = _transformers(src, conv, image)
    assert prompt.startswith("USER: " if kind == "llava-hf" else "[INST] ") or conv[0].role == "system"
    assert "A chat between" not in prompt  # the hub template has no default system prompt
    image_id = AutoProcessor.from_pretrained(str(src)).tokenizer.convert_tokens_to_ids("<image>")

    text, ids, our_logits, our_tokens = _vistune(converted, conv, image, image_id)
    assert text == prompt
    assert ids == inputs["input_ids"][0].tolist()
    assert our_logits.shape == logits.shape  # a foreign folder keeps its image token's row: the same vocabulary
    assert (our_logits - logits).abs().max() < 1e-5
    assert our_tokens == tokens

    back_prompt, back_inputs, back_logits, back_tokens = _transformers(back, conv, image)
    assert back_prompt == prompt
    assert torch.equal(back_inputs["input_ids"], inputs["input_ids"])
    assert (back_logits - logits).abs().max() < 1e-5
    assert back_tokens == tokens


def test_vistune_ask_prints_what_transformers_generates(folders: tuple[str, Path, Path, Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The user's view: `vistune ask` on the converted folder prints transformers' greedy reply."""
    kind, src, converted, _ = folders
    image = _image()
    image.save(tmp_path / "image.png")
    _, _, _, tokens = _transformers(src, CONVERSATIONS["single"], image)
    want = AutoProcessor.from_pretrained(str(src)).tokenizer.decode(tokens, skip_special_tokens=True).strip()
    capsys.readouterr()
    assert main(["ask", str(converted), QUESTION, "--image", str(tmp_path / "image.png"),
                 "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == want


def test_empty_system_prompt_is_representable(spm_tokenizer: Path) -> None:
    """`system_prompt: ""` means no system prompt (what llava-hf's templates render), in vistune's format
    and in the template an export writes for it; None still means the format's default."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    from vistune.chat.formats import get_format
    from vistune.convert.templates import processor_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(spm_tokenizer))
    conv = CONVERSATIONS["single"]
    rendered = "".join(s.text for s in get_format("vicuna_v1", "").render(conv, tokenizer, True))
    assert rendered == f"USER: <image>\n{QUESTION} ASSISTANT:"
    default = "".join(s.text for s in get_format("vicuna_v1", None).render(conv, tokenizer, True))
    assert default.endswith(rendered) and len(default) > len(rendered) + 20
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    template = env.from_string(processor_chat_template("vicuna_v1", "", tokenizer))
    assert template.render(messages=[_parts(conv[0], _image())], add_generation_prompt=True) == rendered


@pytest.mark.parametrize("source", [LLAVA_15_TEMPLATE, LLAVA_NEXT_TEMPLATE, "\n  {% for m in messages %}{{ m['role'] }}"
                                    "{% endfor %}\n"], ids=["llava-1.5", "llava-next", "leading-whitespace"])
def test_carried_template_renders_strings_as_the_source_renders_parts(source: str) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template  # transformers' own environment

    from vistune.convert.templates import carried_source, carry_processor_template

    carried = carry_processor_template(source)
    assert carried_source(carried) == source and carried_source(source) is None
    for conv in CONVERSATIONS.values():
        parts = [{"role": m.role, "content": [p for p in _parts(m, _image())["content"] if p["type"] == "text"]
                  if m.role == "system" else _parts(m, _image())["content"]} for m in conv]
        strings = [{"role": m.role, "content": m.content} for m in conv]
        for gen in (True, False):
            want = _compile_jinja_template(source).render(messages=parts, add_generation_prompt=gen, eos_token="</s>")
            for messages in (strings, parts):
                got = _compile_jinja_template(carried).render(messages=messages, add_generation_prompt=gen,
                                                              eos_token="</s>")
                assert got == want
