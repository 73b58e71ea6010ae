"""Jinja chat templates for a llava-hf processor that render exactly what vistune's formats render.

transformers' processors take messages whose content is a string or a list of parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`); an image part becomes `<image>\\n`, the
placeholder LlavaProcessor expands to the image's tokens. Each template below is the Jinja spelling
of one format in `chat.formats` (a test renders both on the same conversations and compares), so a
model exported to llava-hf is prompted exactly as it was trained. Hand-written because no library
turns a Python formatter into Jinja.
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
    if format_name == "vicuna_v1":
        return _vicuna_v1(system_prompt or VICUNA_SYSTEM, eos)
    if format_name == "llava_v1":  # vicuna_v1's turns, the original LLaVA's system prompt
        return _vicuna_v1(system_prompt or LLAVA_V1_SYSTEM, eos)
    if format_name == "llama_2":
        return _llama_2(system_prompt or LLAMA_2_SYSTEM, bos, eos)
    if format_name == "plain":
        return _plain(eos)
    if not tokenizer.chat_template or not isinstance(tokenizer.chat_template, str):
        raise ValueError("format chat_template: the tokenizer has no (single) chat template to export")
    return _wrap_tokenizer_template(tokenizer.chat_template, system_prompt)
