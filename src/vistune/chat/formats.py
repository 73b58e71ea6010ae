"""Conversation formats: how a list of messages becomes prompt text, segment by segment.

A format renders messages into `Segment`s: stretches of text that are either prompt (not trained
on) or one assistant reply with its end-of-turn token (trained on). Labels are then built from
these segments token by token (see `chat.encode`), so no format needs its own masking code.

Formats (exact keys):
- `plain`: LLaVA's alignment format, the image tokens then the caption. LLaVA ends the caption with
  "\n"; vistune ends it with the tokenizer's EOS so a stage-1 model stops on its own when asked.
- `vicuna_v1`: LLaVA-1.5's format and system prompt (`--version v1`, LLaVA's `conv_vicuna_v1`):
  "SYSTEM USER: q ASSISTANT: a</s>USER: ...".
- `llava_v1`: the same turns with the original LLaVA's system prompt (LLaVA's `conv_llava_v1`: "curious
  human ... human's questions"), for models trained with it.
- `llama_2`: LLaVA's Llama-2 format: "[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\nq [/INST] a </s><s>[INST] ...".
- `chat_template`: the tokenizer's own Jinja chat template (ChatML for Qwen2 and SmolLM2, ...).
- `hf_processor`: a llava-hf folder's processor template, rendered and tokenized as transformers'
  processor does (what `vistune convert` gives a converted llava-hf / llava-next model).
In `vicuna_v1` and `llama_2` the end-of-turn "</s>" is the tokenizer's own EOS token, so the formats
also work with LLMs whose EOS is spelled differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from vistune.errors import LabelError, RegistryKeyError
from vistune.tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:  # kept out of the import path: the config imports this module to check format keys
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    """A stretch of rendered text; `reply` is set on supervised segments: the text they must decode to."""

    text: str
    reply: str | None = None

    @property
    def supervised(self) -> bool:
        return self.reply is not None


# LLaVA-1.5 trains and evaluates with `--version v1`, i.e. conv_vicuna_v1's "user" wording.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The original LLaVA's conv_llava_v1 ("human" wording), same separators as vicuna_v1.
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)



def chatml_template(system: str) -> str:
    """A ChatML Jinja chat template (the structure SmolLM2-Instruct and Qwen2 use) with a default
    system turn, for tokenizers built from scratch (the demo's stand-in LLM, the test fixtures)."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )

def _split_system(messages: list[Message], default: str | None) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return default, messages


def _check_alternation(messages: list[Message], fmt: str) -> None:
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise LabelError(f"format {fmt}: message {i} is from {m.role!r}, expected {want!r} (turns must alternate)")


class ConversationFormat(Protocol):
    name: str

    def render(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool) -> list[Segment]: ...

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]: ...

    @property
    def adds_tokenizer_bos(self) -> bool:
        """Prepend BOS when the tokenizer itself would (Llama does, GPT-2-style BPE does not)."""
        ...


def _eos_stop(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [tokenizer.eos_token] if tokenizer.eos_token else []


@dataclass(frozen=True)
class Plain:
    name: ClassVar[str] = "plain"
    adds_tokenizer_bos: bool = True

    def render(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool) -> list[Segment]:
        _, turns = _split_system(messages, None)
        _check_alternation(turns, self.name)
        if len(turns) > 2:
            raise LabelError(f"format plain takes one image-caption pair, got {len(turns)} messages")
        # Only the image survives from the user turn: alignment learns image -> caption, nothing else.
        n_images = turns[0].content.count(IMAGE_PLACEHOLDER) if turns else 0
        segments = [Segment(IMAGE_PLACEHOLDER * n_images)]
        if len(turns) == 2 and not add_generation_prompt:
            segments.append(Segment(turns[1].content + (tokenizer.eos_token or ""), reply=turns[1].content))
        return segments

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return _eos_stop(tokenizer)


@dataclass(frozen=True)
class _TurnFormat:
    """A format written as a loop over turns: prompt text for each user turn, then the reply with
    its end-of-turn token. Subclasses say how a user turn and a reply are spelled."""

    system: str | None = None
    adds_tokenizer_bos: bool = True
    name: ClassVar[str]
    default_system: ClassVar[str]

    def preamble(self, system: str | None) -> str:
        return ""

    def user(self, index: int, content: str, system: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
        raise NotImplementedError

    def reply(self, content: str, tokenizer: PreTrainedTokenizerBase) -> str:
        raise NotImplementedError

    def render(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool) -> list[Segment]:
        # `system=""` is the empty system prompt (llava-hf's templates have none), not "use the default".
        system, turns = _split_system(messages, self.default_system if self.system is None else self.system)
        _check_alternation(turns, self.name)
        segments: list[Segment] = []
        prompt = self.preamble(system)
        for i, m in enumerate(turns):
            if m.role == "user":
                prompt += self.user(i, m.content, system, tokenizer)
            else:
                segments += [Segment(prompt), Segment(self.reply(m.content, tokenizer), reply=m.content)]
                prompt = ""
        if prompt:
            segments.append(Segment(prompt))
        return segments

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return _eos_stop(tokenizer)


@dataclass(frozen=True)
class VicunaV1(_TurnFormat):
    name: ClassVar[str] = "vicuna_v1"
    default_system: ClassVar[str] = VICUNA_SYSTEM

    def preamble(self, system: str | None) -> str:
        return f"{system} " if system else ""

    def user(self, index: int, content: str, system: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
        return f"USER: {content} ASSISTANT:"

    def reply(self, content: str, tokenizer: PreTrainedTokenizerBase) -> str:
        return f" {content}{tokenizer.eos_token or ''}"


@dataclass(frozen=True)
class LlavaV1(VicunaV1):
    name: ClassVar[str] = "llava_v1"
    default_system: ClassVar[str] = LLAVA_V1_SYSTEM


@dataclass(frozen=True)
class Llama2(_TurnFormat):
    name: ClassVar[str] = "llama_2"
    default_system: ClassVar[str] = LLAMA_2_SYSTEM

    def user(self, index: int, content: str, system: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
        if index == 0 and system:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        # Turns after the first open with BOS again, as Llama-2-chat was trained.
        return f"{tokenizer.bos_token or '' if index else ''}[INST] {content} [/INST]"

    def reply(self, content: str, tokenizer: PreTrainedTokenizerBase) -> str:
        return f" {content} {tokenizer.eos_token or ''}"


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own template. Replies are located by rendering each conversation prefix; a
    template whose renderings are not prefixes of each other (e.g. one that rewrites earlier turns)
    is refused, since its labels could not be trusted."""

    system: str | None = None
    name: ClassVar[str] = "chat_template"
    adds_tokenizer_bos: bool = False  # templates write their own BOS into the text

    def _render(self, tokenizer: PreTrainedTokenizerBase, messages: list[Message], gen: bool) -> str:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=gen
        )

    def render(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase,
               add_generation_prompt: bool) -> list[Segment]:
        if not tokenizer.chat_template:
            raise RegistryKeyError("format chat_template: the tokenizer has no chat template; pick vicuna_v1 or llama_2")
        if self.system and not (messages and messages[0].role == "system"):
            messages = [Message("system", self.system), *messages]
        _, turns = _split_system(messages, None)
        _check_alternation(turns, self.name)
        full = self._render(tokenizer, messages, add_generation_prompt)
        segments: list[Segment] = []
        pos = 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            start = len(self._render(tokenizer, messages[:i], True))
            through = self._render(tokenizer, messages[: i + 1], False)
            if not full.startswith(through) or not through.startswith(full[:start]):
                raise LabelError("format chat_template: the tokenizer's template renders earlier turns differently "
                                 "as the conversation grows, so replies cannot be located; use vicuna_v1")
            found = through.find(m.content, start)
            if found < 0:
                raise LabelError(f"format chat_template: reply {i} does not appear verbatim in the rendered text")
            # Supervise the reply through its end-of-turn marker, not the whitespace after it.
            end = len(through.rstrip())
            segments += [Segment(full[pos:start]), Segment(full[start:end], reply=m.content)]
            pos = end
        if pos < len(full):
            segments.append(Segment(full[pos:]))
        return segments

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The template's end-of-turn marker (e.g. <|im_end|>) and the tokenizer's EOS."""
        probe = [Message("user", "q"), Message("assistant", "REPLY")]
        text = self._render(tokenizer, probe, False)
        tail = text[text.rfind("REPLY") + len("REPLY"):].strip()
        stops = [s for s in tokenizer.all_special_tokens if tail.startswith(s)][:1]
        if tokenizer.eos_token and tokenizer.eos_token not in stops:
            stops.append(tokenizer.eos_token)
        return stops


@dataclass(frozen=True)
class ProcessorTemplate(ChatTemplate):
    """A transformers processor's chat template, as a llava-hf / llava-next folder ships it (carried into
    the tokenizer by `vistune convert`, see convert/templates.py), used the way the processor uses it:
    the tokenizer's BOS is added to the rendered prompt, and the text after each `<image>` is tokenized
    as the continuation of the prompt (`image_in_place`), not on its own as LLaVA does."""

    name: ClassVar[str] = "hf_processor"
    adds_tokenizer_bos: bool = True
    image_in_place: ClassVar[bool] = True


FORMAT_KEYS = ("plain", "vicuna_v1", "llava_v1", "llama_2", "chat_template", "hf_processor")


def check_format_key(name: str) -> str:
    if name not in FORMAT_KEYS:
        raise RegistryKeyError(f"unknown conversation format {name!r}; valid keys: {', '.join(FORMAT_KEYS)}")
    return name


def get_format(name: str, system: str | None = None) -> ConversationFormat:
    """The format registered under exactly `name`; `system` overrides its default system prompt."""
    check_format_key(name)
    if name == "plain":
        return Plain()
    if name == "vicuna_v1":
        return VicunaV1(system)
    if name == "llava_v1":
        return LlavaV1(system)
    if name == "llama_2":
        return Llama2(system)
    if name == "hf_processor":
        return ProcessorTemplate(system)
    return ChatTemplate(system)
