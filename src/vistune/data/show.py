"""`vistune data show`: each sample as a stage will train on it, with the supervised spans marked.

The same steps as training, stopped before tokenization: read and check the records
(`data.records`), apply the stage's data rules (`data.rules`: the `<image>` move), render with the
stage's format and system prompt. Each sample is then also encoded (`chat.encode`) so that a sample
whose labels could not be built is shown with the error training would raise, rather than masked
quietly. Nothing is written and no weights are loaded (only the tokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import ConversationFormat, get_format
from vistune.config import RunConfig
from vistune.data.records import Problems, Sample, load_samples
from vistune.data.rules import apply_rules
from vistune.errors import ConfigError, DataError

# Marks around supervised spans in the human-readable view (the JSON view lists the spans instead).
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧


@dataclass(frozen=True)
class Shown:
    """One sample as rendered: `text` is prompt and replies (each image as `<image>`), `supervised`
    the texts of the spans that carry labels, end-of-turn tokens written as the tokenizer spells them."""

    id: str
    text: str
    supervised: list[str]
    spans: list[tuple[int, int]]  # character offsets of each supervised span in `text`
    error: str | None = None  # the LabelError training would raise for this sample

    def to_json(self) -> str:
        row: dict[str, object] = {"id": self.id, "text": self.text, "supervised": self.supervised}
        if self.error:
            row["error"] = self.error
        return json.dumps(row, ensure_ascii=False)

    def marked(self) -> str:
        """The text with each supervised span between ⟦ and ⟧."""
        out, pos = [], 0
        for start, end in self.spans:
            out += [self.text[pos:start], OPEN, self.text[start:end], CLOSE]
            pos = end
        out.append(self.text[pos:])
        return "".join(out)


def render_sample(sample: Sample, fmt: ConversationFormat, tokenizer: PreTrainedTokenizerBase,
                  encoder: ChatEncoder | None = None) -> Shown:
    """`sample` (after the data rules) rendered by `fmt`; with `encoder`, also checked as training checks it."""
    segments = fmt.render(list(sample.messages), tokenizer, add_generation_prompt=False)
    text, spans, supervised = "", [], []
    for seg in segments:
        if seg.supervised:
            spans.append((len(text), len(text) + len(seg.text)))
            supervised.append(seg.text)
        text += seg.text
    error = None
    if encoder is not None:
        try:
            encoder.encode(list(sample.messages), sample.id, image_tokens=[1] * len(sample.images))
        except DataError as e:
            error = str(e)
    return Shown(sample.id, text, supervised, spans, error)


def show_stage(cfg: RunConfig, stage_name: str | None, limit: int | None, tokenizer: PreTrainedTokenizerBase,
               problems: Problems) -> Iterator[Shown]:
    """The first `limit` samples of a stage (all when None) as the stage trains on them; records dropped
    under `on_bad_sample: skip` are counted in `problems`."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of samples")
    name = pick_stage(cfg, stage_name)
    stage = cfg.stages[name]
    samples = load_samples(stage.data.path, stage.data.image_folder, stage.data.on_bad_sample == "skip", problems)
    samples = apply_rules(samples[:limit] if limit is not None else samples, stage.data.image_placement)
    fmt = get_format(stage.format, stage.system_prompt)
    # One token per image is enough to check the labels; lengths are not shown, so no truncation.
    encoder = ChatEncoder(tokenizer, fmt, num_image_tokens=1)
    for sample in samples:
        yield render_sample(sample, fmt, tokenizer, encoder)


def pick_stage(cfg: RunConfig, stage_name: str | None) -> str:
    if stage_name is None:
        if len(cfg.stages) == 1:
            return next(iter(cfg.stages))
        raise ConfigError(f"name a stage with --stage; this config has: {', '.join(cfg.stages)}")
    if stage_name not in cfg.stages:
        raise ConfigError(f"unknown stage {stage_name!r}; this config has: {', '.join(cfg.stages)}")
    return stage_name
