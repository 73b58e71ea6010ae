"""The request models of the HTTP API: the subset of OpenAI's chat-completions request that a vistune
model can honour, validated before any work.

Unknown extra fields are ignored (clients send e.g. `user`); fields we cannot honour are rejected.
Sampling values are checked against what the engine can take, so that a bad value is a 400 naming
the field rather than a fault in the batch it would share (issue 17):
- seed: 0 .. 2**63 - 1 (torch.Generator.manual_seed takes a signed 64-bit integer);
- temperature: 0 (greedy) or MIN_TEMPERATURE .. 2 (OpenAI's range). Dividing logits by 1e-45 makes
  them inf, and softmax then NaN; vLLM clamps anything under 1e-2 for the same reason, here it is
  refused, so the client knows it did not get what it asked for;
- top_p: (0, 1];
- text: valid Unicode (a lone surrogate such as "\\ud800" cannot be encoded to UTF-8 and would fail
  in the tokenizer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MIN_TEMPERATURE = 1e-2  # vLLM's floor too (sampling_params._MAX_TEMP)
MAX_SEED = 2**63 - 1


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds {text[e.start:e.end]!a} at character {e.start}, which is not "
                         "valid Unicode (a lone surrogate); send valid UTF-8") from None
    return text


def _temperature(t: float) -> float:
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"temperature {t:g} is too small to sample with; send 0 for greedy decoding or at "
                         f"least {MIN_TEMPERATURE:g}")
    return t


Text = Annotated[str, AfterValidator(_unicode)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; one resolution per model


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's default and range; send 0 for greedy decoding.
    temperature: Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_temperature)] = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension (pass it in extra_body): fixed-length replies for benchmarks
