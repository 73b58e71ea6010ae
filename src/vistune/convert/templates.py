"""Jinja chat templates for a llava-hf processor that render exactly what vistune's formats render.

transformers' processors take messages whose content is a string or a list of parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`); an image part becomes `<image>\\n`, the
placeholder LlavaProcessor expands to the image's tokens. Each template below is the Jinja spelling
of one format in `chat.formats` (a test renders both on the same conversations and compares), so a
model exported to llava-hf is prompted exactly as it was trained. Hand-written because no library
turns a Python formatter into Jinja.

The other way round, a llava-hf folder's own processor template is carried into vistune unchanged
(`carry_processor_template`): vistune's `chat_template` format renders it with string contents, so
a short Jinja head turns each string into the parts the template expects. Exporting writes the
original template back (`carried_source`).
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from vistune.chat.formats import (
    IMAGE_PLACEHOLDER,
    LLAMA_2_SYSTEM,
    LLAVA_V1_SYSTEM,
    VICUNA_SYSTEM,
    check_format_key,
)

# Content (a string or a list of parts) -> text, image parts as the placeholder.
_TEXT = (
    "{%- macro vt_text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] == 'image' -%}{{ '" + IMAGE_PLACEHOLDER + "\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
# The system prompt: the first message's when it is a system message, else the format's default.
_SYSTEM = (
    "{%- set ns = namespace(system={default}, start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = vt_text(messages[0]['content']) -%}{%- set ns.start = 1 -%}{%- endif -%}"
)


# Marks where a carried processor template starts; what follows it is the template as the source had it.
# The newline after it is removed by the `trim_blocks` transformers renders with, and leaves the
# template starting at the beginning of a line, as it did on its own (`lstrip_blocks` sees the same).
_CARRIED_MARK = "{#- vistune: the source processor's chat template follows, unchanged #}\n"
# String contents -> transformers' parts: each `<image>` (and the newline after it, which the parts
# form writes itself) becomes an image part, the text around it text parts. List contents pass as they are.
_STRING_TO_PARTS = (
    "{%- set vt = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set vp = namespace(parts=[]) -%}"
    "{%- for piece in m['content'].split('" + IMAGE_PLACEHOLDER + "') -%}"
    "{%- if not loop.first -%}{%- set vp.parts = vp.parts + [{'type': 'image'}] -%}{%- endif -%}"
    "{%- set text = piece[1:] if (not loop.first and piece.startswith('\\n')) else piece -%}"
    "{%- if text -%}{%- set vp.parts = vp.parts + [{'type': 'text', 'text': text}] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not vp.parts -%}{%- set vp.parts = [{'type': 'text', 'text': ''}] -%}{%- endif -%}"
    "{%- set vt.msgs = vt.msgs + [{'role': m['role'], 'content': vp.parts}] -%}"
    "{%- else -%}{%- set vt.msgs = vt.msgs + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = vt.msgs -%}"
)


def carry_processor_template(source: str) -> str:
    """A tokenizer chat template rendering what the processor template `source` renders, from string
    contents too (format `hf_processor` renders with string contents)."""
    return _STRING_TO_PARTS + _CARRIED_MARK + source


def carried_source(template: str | None) -> str | None:
    """The processor template a carried template was made from, or None when it is not one."""
    if not isinstance(template, str) or _CARRIED_MARK not in template:
        return None
    return template.split(_CARRIED_MARK, 1)[1]


def _lit(text: str | None) -> str:
    """A Jinja string literal (JSON's escapes are a subset of Jinja's)."""
    return json.dumps(text or "", ensure_ascii=False)


def _vicuna_v1(system: str, eos: str) -> str:
    return _TEXT + _SYSTEM.replace("{default}", _lit(system)) + (
        "{%- if ns.system -%}{{ ns.system + ' ' }}{%- endif -%}"
        "{%- for m in messages[ns.start:] -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + vt_text(m['content']) + ' ASSISTANT:' }}"
        "{%- else -%}{{ ' ' + vt_text(m['content']) + " + _lit(eos) + " }}{%- endif -%}"
        "{%- endfor -%}"
    )


def _llama_2(system: str, bos: str, eos: str) -> str:
    return _TEXT + _SYSTEM.replace("{default}", _lit(system)) + (
        "{%- for m in messages[ns.start:] -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set content = vt_text(m['content']) -%}"
        "{%- if loop.first and ns.system -%}"
        "{%- set content = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}"
        "{%- if not loop.first -%}{{ " + _lit(bos) + " }}{%- endif -%}"
        "{{ '[INST] ' + content + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + vt_text(m['content']) + ' ' + " + _lit(eos) + " }}{%- endif -%}"
        "{%- endfor -%}"
    )


def _plain(eos: str) -> str:
    # Alignment format: only the image placeholders of the user turn, then the caption.
    return _TEXT + _SYSTEM.replace("{default}", '""') + (
        "{%- set turns = messages[ns.start:] -%}"
        "{%- if turns -%}{{ '" + IMAGE_PLACEHOLDER + "' * ((vt_text(turns[0]['content']).split('"
        + IMAGE_PLACEHOLDER + "') | length) - 1) }}{%- endif -%}"
        "{%- if turns | length == 2 and not add_generation_prompt -%}"
        "{{ vt_text(turns[1]['content']) + " + _lit(eos) + " }}{%- endif -%}"
    )


def _wrap_tokenizer_template(template: str, system: str | None) -> str:
    """The LLM's own template, fed string contents (and vistune's system prompt when one is set)."""
    prefix = _TEXT + "{%- set ns = namespace(msgs=[]) -%}"
    if system:
        prefix += ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
                   "{%- set ns.msgs = [{'role': 'system', 'content': " + _lit(system) + "}] -%}{%- endif -%}")
    prefix += ("{%- for m in messages -%}{%- set ns.msgs = ns.msgs + [{'role': m['role'], "
               "'content': vt_text(m['content'])}] -%}{%- endfor -%}")
    # No '-' on the last tag: the template's own leading whitespace is kept as it was.
    return prefix + "{%- set messages = ns.msgs %}" + template


def processor_chat_template(format_name: str, system_prompt: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja template that renders `format_name` (with `system_prompt`) for `tokenizer`."""
    check_format_key(format_name)
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    # `system_prompt=""` is a system prompt too: the empty one (llava-hf's templates have none).
    if format_name == "vicuna_v1":
        return _vicuna_v1(VICUNA_SYSTEM if system_prompt is None else system_prompt, eos)
    if format_name == "llava_v1":  # vicuna_v1's turns, the original LLaVA's system prompt
        return _vicuna_v1(LLAVA_V1_SYSTEM if system_prompt is None else system_prompt, eos)
    if format_name == "llama_2":
        return _llama_2(LLAMA_2_SYSTEM if system_prompt is None else system_prompt, bos, eos)
    if format_name == "plain":
        return _plain(eos)
    if not tokenizer.chat_template or not isinstance(tokenizer.chat_template, str):
        raise ValueError("format chat_template: the tokenizer has no (single) chat template to export")
    if format_name == "hf_processor":  # a processor's template (carried in by an import): give it back as it was
        source = carried_source(tokenizer.chat_template) or tokenizer.chat_template
        return _with_system_part(source, system_prompt) if system_prompt else source
    return _wrap_tokenizer_template(tokenizer.chat_template, system_prompt)


def _with_system_part(template: str, system: str) -> str:
    """A processor template that is given `system` as a system message when the conversation has none."""
    return ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
            "{%- set messages = [{'role': 'system', 'content': [{'type': 'text', 'text': " + _lit(system) + "}]}]"
            " + messages -%}{%- endif -%}" + _CARRIED_MARK + template)
