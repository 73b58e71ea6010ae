"""The inference engine: load a checkpoint once, then answer conversations with images.

Chat, `ask`, evaluation and serving all go through `Engine`. Generation is the LLM's own
`generate` (KV cache, greedy or sampled, stop tokens); streaming is transformers'
`TextIteratorStreamer` with `generate` on a worker thread. Batches are left-padded so every
prompt ends where its reply begins.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from vistune.chat.encode import ChatEncoder
from vistune.chat.formats import IMAGE_PLACEHOLDER, Message, get_format
from vistune.data.dataset import load_image
from vistune.errors import DataError
from vistune.model.checkpoint import Bundle, load_checkpoint
from vistune.model.vision import preprocess_images

ImageInput = Image.Image | str | Path


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


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

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        spec = bundle.spec
        self.encoder = ChatEncoder(self.tokenizer, get_format(spec.conversation_format, spec.system_prompt),
                                   spec.num_image_tokens)
        self.stop_ids = self.encoder.stop_token_ids()
        self.device = next(self.model.llm.parameters()).device

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> Engine:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        return cls(load_checkpoint(path, dtype=dtype, device=device))

    def _prepare(self, messages: list[Message], images: Sequence[ImageInput]) -> tuple[list[int], torch.Tensor | None]:
        n_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if images and n_placeholders == 0:
            # Convenience for callers that pass an image but no placeholder: it goes before the first
            # user message, as in the training data.
            first = next(i for i, m in enumerate(messages) if m.role == "user")
            messages = list(messages)
            messages[first] = Message("user", IMAGE_PLACEHOLDER * len(images) + "\n" + messages[first].content)
        elif n_placeholders != len(images):
            raise DataError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
        enc = self.encoder.encode(messages, "prompt", add_generation_prompt=True)
        if len(enc.input_ids) > self.bundle.spec.model_max_length:
            raise DataError(f"prompt is {len(enc.input_ids)} tokens, over the model's "
                            f"model_max_length {self.bundle.spec.model_max_length}")
        pil = [im if isinstance(im, Image.Image) else load_image(im, "prompt") for im in images]
        pixels = preprocess_images(pil, self.bundle.image_processor, self.bundle.spec.vision.image_preprocess) if pil else None
        return enc.input_ids, pixels

    def _batch(self, conversations: Sequence[Sequence[Message | dict[str, str]]],
               images: Sequence[Sequence[ImageInput]]) -> dict[str, torch.Tensor | None]:
        if len(images) != len(conversations):
            raise ValueError("give one image list per conversation (an empty list for none)")
        prepared = [self._prepare(_as_messages(c), imgs) for c, imgs in zip(conversations, images)]
        length = max(len(ids) for ids, _ in prepared)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prepared), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prepared), length), dtype=torch.long)
        for i, (ids, _) in enumerate(prepared):
            input_ids[i, length - len(ids):] = torch.tensor(ids)  # left padding
            mask[i, length - len(ids):] = 1
        pixels = [p for _, p in prepared if p is not None]
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "pixel_values": torch.cat(pixels).to(self.device) if pixels else None}

    def _generate_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        return {**sampling.generate_kwargs(), "eos_token_id": self.stop_ids or None,
                "pad_token_id": self.tokenizer.pad_token_id}

    def generate(self, conversations: Sequence[Sequence[Message | dict[str, str]]],
                 images: Sequence[Sequence[ImageInput]], sampling: Sampling = Sampling()) -> list[str]:
        """Replies for a batch of conversations (each ending with a user message)."""
        batch = self._batch(conversations, images)
        out = self.model.generate(**batch, **self._generate_kwargs(sampling))  # [B, new]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    def stream(self, messages: Sequence[Message | dict[str, str]], images: Sequence[ImageInput] = (),
               sampling: Sampling = Sampling()) -> Iterator[str]:
        """The reply to one conversation, piece by piece as it is generated."""
        batch = self._batch([messages], [images])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**batch, **self._generate_kwargs(sampling), "streamer": streamer}
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(**kwargs)
            except Exception as e:  # re-raised in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            if piece:
                yield piece
        thread.join()
        if errors:
            raise errors[0]

    def chat(self, messages: Sequence[Message | dict[str, str]], images: Sequence[ImageInput] = (),
             sampling: Sampling = Sampling(), stream: bool = False) -> str | Iterator[str]:
        """Answer one conversation: the whole reply, or an iterator of pieces with stream=True."""
        if stream:
            return self.stream(messages, images, sampling)
        return self.generate([messages], [images], sampling)[0]

    def ask(self, image: ImageInput | None, question: str, sampling: Sampling = Sampling()) -> str:
        """One question about one image (or none)."""
        return self.generate([[Message("user", question)]], [[image] if image is not None else []], sampling)[0]


def load(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> Engine:
    """Load a vistune checkpoint folder for inference: `vistune.load("runs/x/finetune").ask(img, "What is it?")`."""
    return Engine.load(path, device, dtype)
