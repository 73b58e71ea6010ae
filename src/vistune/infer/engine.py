"""The inference engine: load a checkpoint once, then answer conversations with images.

Chat, `ask`, evaluation and serving all go through `Engine`. Generation is the LLM's own
`generate` (KV cache, greedy or sampled, stop tokens); streaming is transformers'
`TextIteratorStreamer` with `generate` on a worker thread. Batches are left-padded so every
prompt ends where its reply begins.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteriaList

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import IMAGE_PLACEHOLDER, Message, get_format
from vistune.errors import DataError
from vistune.images import load_image
from vistune.infer.rows import Completion, Row, RowSampler, RowTracker, Sampling
from vistune.infer.load import ModelIdentity, load_model, model_identity
from vistune.model.checkpoint import Bundle
from vistune.model.tiling import ImagePreprocessor

ImageInput = Image.Image | str | Path


@dataclass(frozen=True)
class Prompt:
    """A conversation made ready for the model: token ids (image slots expanded) and its images."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [N_tiles, 3, H, W], or None without images
    image_sizes: torch.Tensor | None = None  # [N, 2] (height, width) of each image


@dataclass(frozen=True)
class Job:
    """One reply to generate within a batch: the prompt, its settings, and optional hooks."""

    prompt: Prompt
    sampling: Sampling = Sampling()
    on_text: Callable[[str], None] | None = None  # called with each final piece of the reply
    cancel: threading.Event | None = None  # set to stop this reply early; the rest of the batch goes on
    on_finish: Callable[[Completion], None] | None = None  # called as soon as this reply ends


def _as_messages(messages: Sequence[Message | dict[str, str]]) -> list[Message]:
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
        else:
            out.append(Message(m["role"], m["content"]))  # type: ignore[arg-type]
    return out


class Engine:
    """Answers conversations with a loaded vistune model."""

    def __init__(self, bundle: Bundle, identity: ModelIdentity | None = None) -> None:
        self.bundle = bundle
        self.identity = identity  # which folder it was loaded from (None: built in memory)
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        spec = bundle.spec
        self.encoder = ChatEncoder(self.tokenizer, get_format(spec.conversation_format, spec.system_prompt),
                                   spec.num_image_tokens)
        self.stop_ids = self.encoder.stop_token_ids()
        self.images = ImagePreprocessor(self.model.layout, bundle.image_processor, spec.vision.image_preprocess)
        self.device = next(self.model.llm.parameters()).device

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
             vision: Path | None = None, llm: Path | None = None, base: Path | None = None) -> Engine:
        """Any folder `vistune.infer.load.load_model` reads (vistune, step-N, llava-hf, llava-next, LLaVA)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        bundle = load_model(path, device, dtype, vision=vision, llm=llm, base=base)
        return cls(bundle, model_identity(path))

    def prepare(self, messages: Sequence[Message | dict[str, str]], images: Sequence[ImageInput] = ()) -> Prompt:
        """Tokenize a conversation (ending with a user message) and preprocess its images.
        Raises DataError when placeholders and images disagree, an image is unreadable or the prompt
        is longer than the model's model_max_length."""
        messages = _as_messages(messages)
        n_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if images and n_placeholders == 0:
            # Convenience for callers that pass an image but no placeholder: it goes before the first
            # user message, as in the training data.
            first = next(i for i, m in enumerate(messages) if m.role == "user")
            messages = list(messages)
            messages[first] = Message("user", IMAGE_PLACEHOLDER * len(images) + "\n" + messages[first].content)
        elif n_placeholders != len(images):
            raise DataError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
        pil = [im if isinstance(im, Image.Image) else load_image(im, "prompt") for im in images]
        counts = None if self.model.layout.mode == "single" else [self.images.num_tokens(im) for im in pil]
        enc = self.encoder.encode(messages, "prompt", add_generation_prompt=True, image_tokens=counts,
                                  check_labels=False)  # a prompt has no supervised spans to check
        if len(enc.input_ids) > self.bundle.spec.model_max_length:
            raise DataError(f"prompt is {len(enc.input_ids)} tokens, over the model's "
                            f"model_max_length {self.bundle.spec.model_max_length}", "prompt too long")
        pixels, sizes = self.images(pil) if pil else (None, None)
        return Prompt(enc.input_ids, pixels, sizes)

    def _batch(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor | None]:
        length = max(len(p.input_ids) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(prompts), length), dtype=torch.long)  # [B, T]
        for i, p in enumerate(prompts):
            input_ids[i, length - len(p.input_ids):] = torch.tensor(p.input_ids)  # left padding
            mask[i, length - len(p.input_ids):] = 1
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        sizes = [p.image_sizes for p in prompts if p.image_sizes is not None]
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "pixel_values": torch.cat(pixels).to(self.device) if pixels else None,
                "image_sizes": torch.cat(sizes) if sizes else None}

    def run(self, jobs: Sequence[Job]) -> list[Completion]:
        """Generate the replies of a batch of prepared jobs in one `generate` call, each with its own
        sampling, stop rules, streaming hook and cancel flag (see `vistune.infer.rows`). A row whose
        reply ended early only pads along until the longest one ends."""
        if not jobs:
            return []
        rows = [Row(j.sampling, j.on_text, j.cancel, j.on_finish, len(j.prompt.input_ids)) for j in jobs]
        tracker = RowTracker(rows, self.tokenizer, self.stop_ids)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(j.sampling.max_new_tokens for j in jobs), "do_sample": False,
            # Stop tokens are the tracker's business (per row, and ignore_eos); an empty list keeps
            # generate from adding its own batch-wide rule from the LLM's generation config.
            "eos_token_id": [], "pad_token_id": self.tokenizer.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([tracker]),
        }
        if not all(j.sampling.greedy for j in jobs):
            kwargs["logits_processor"] = LogitsProcessorList([RowSampler([j.sampling for j in jobs], self.device)])
        self.model.generate(**self._batch([j.prompt for j in jobs]), **kwargs)  # [B, new]
        for row in rows:
            if row.finish_reason is None:  # generate stopped first (its own length cap)
                tracker.finish(row, "length")
        return [r.completion() for r in rows]

    def generate(self, conversations: Sequence[Sequence[Message | dict[str, str]]],
                 images: Sequence[Sequence[ImageInput]], sampling: Sampling | Sequence[Sampling] = Sampling()
                 ) -> list[str]:
        """Replies for a batch of conversations (each ending with a user message); one Sampling for
        all or one per conversation."""
        if len(images) != len(conversations):
            raise ValueError("give one image list per conversation (an empty list for none)")
        samplings = [sampling] * len(conversations) if isinstance(sampling, Sampling) else list(sampling)
        jobs = [Job(self.prepare(c, imgs), s) for c, imgs, s in zip(conversations, images, samplings)]
        return [c.text.strip() for c in self.run(jobs)]

    def stream(self, messages: Sequence[Message | dict[str, str]], images: Sequence[ImageInput] = (),
               sampling: Sampling = Sampling()) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated. Closing the iterator
        early stops the generation."""
        pieces: queue.Queue[str | None] = queue.Queue()
        cancel = threading.Event()
        job = Job(self.prepare(messages, images), sampling, pieces.put, cancel)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.run([job])
            except Exception as e:  # re-raised in the caller's thread below
                errors.append(e)
            finally:
                pieces.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (piece := pieces.get()) is not None:
                yield piece
        finally:
            cancel.set()
            thread.join()
        if errors:
            raise errors[0]

    def chat(self, messages: Sequence[Message | dict[str, str]], images: Sequence[ImageInput] = (),
             sampling: Sampling = Sampling(), stream: bool = False) -> str | Iterator[str]:
        """Answer one conversation: the whole reply, or an iterator of pieces with stream=True."""
        if stream:
            return self.stream(messages, images, sampling)
        return self.generate([messages], [images], sampling)[0]

    def ask(self, image: ImageInput | None, question: str, sampling: Sampling | None = None,
            **settings: Any) -> str:
        """One question about one image (or none). Sampling settings as keywords
        (`ask(img, "What is it?", max_new_tokens=64, temperature=0.7)`) or as a `Sampling`, not both."""
        if settings:
            if sampling is not None:
                raise TypeError("give sampling settings as keywords or as a Sampling, not both")
            unknown = sorted(set(settings) - {f.name for f in fields(Sampling)})
            if unknown:
                raise TypeError(f"unknown sampling setting(s) {unknown}; valid: "
                                f"{', '.join(f.name for f in fields(Sampling))}")
            sampling = Sampling(**settings)
        images = [image] if image is not None else []
        return self.generate([[Message("user", question)]], [images], sampling or Sampling())[0]


def load(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
         vision: Path | None = None, llm: Path | None = None, base: Path | None = None) -> Engine:
    """Load a model folder for inference: `vistune.load("runs/x/finetune").ask(img, "What is it?")`. Reads vistune
    checkpoints, mid-run `checkpoints/step-N` folders, llava-hf, llava-next and original LLaVA folders."""
    return Engine.load(path, device, dtype, vision, llm, base)
