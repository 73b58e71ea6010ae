"""Messages -> token ids and labels, built turn by turn and checked.

The reference LLaVA code renders a whole conversation, tokenizes it, then masks the prompt by
splitting the text and subtracting token counts; when the counts disagree it masks the whole
sample and prints "tokenization mismatch", and users train on loss 0. Here labels come from the
token ids themselves:

1. the format renders segments (prompt text, or one reply with its end-of-turn token);
2. text between image placeholders is tokenized once, and each token is given to the segment its
   characters lie in (offsets); a token spanning a prompt/reply boundary is an error. The ids are
   exactly the tokenization of the whole text. (Slow tokenizers, without offsets, tokenize each
   prefix instead and require the ids before a boundary to stay a prefix of the ids after it.)
3. each reply's tokens must decode back to the reply's text.
If 2 or 3 fails, a `LabelError` names the sample; nothing is masked quietly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vistune.chat.formats import IMAGE_PLACEHOLDER, ConversationFormat, Message, Segment
from vistune.errors import DataError, LabelError
from vistune.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_images: int  # images whose tokens are in input_ids (fewer than given if truncation cut some)
    truncated: bool = False
    supervised_cut: int = 0  # reply tokens lost to truncation

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatEncoder:
    """Turns conversations into model inputs for one tokenizer, format and image-token count."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: ConversationFormat, num_image_tokens: int,
                 max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.format = fmt
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        probe = tokenizer("a").input_ids
        # As transformers' processors do (format hf_processor): `<image>` is a token of the tokenizer, and the
        # text after it is tokenized as the rest of one prompt (no fresh word-start piece).
        self.image_in_place = (getattr(fmt, "image_in_place", False)
                               and IMAGE_PLACEHOLDER in tokenizer.get_added_vocab())
        self.bos: list[int] = (
            [tokenizer.bos_token_id]
            if fmt.adds_tokenizer_bos and tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
            else []
        )

    def stop_token_ids(self) -> list[int]:
        ids: list[int] = []
        for s in self.format.stop_strings(self.tokenizer):
            tok = self.tokenizer.convert_tokens_to_ids(s)
            if isinstance(tok, int) and tok != self.tokenizer.unk_token_id and tok not in ids:
                ids.append(tok)
        return ids

    def _tokenize_run(self, texts: list[str], sample: str, after_image: bool = False) -> list[list[int]]:
        """Ids for consecutive texts, such that their concatenation is the tokenization of ''.join(texts)
        (with `image_in_place`, of that text following `<image>`)."""
        if after_image and self.image_in_place:
            return self._tokenize_run([IMAGE_PLACEHOLDER, *texts], sample)[1:]
        if len(texts) == 1:
            return [self.tokenizer(texts[0], add_special_tokens=False).input_ids]
        if self.tokenizer.is_fast:
            return self._split_by_offsets(texts, sample)
        return self._split_by_prefixes(texts, sample)

    def _split_by_offsets(self, texts: list[str], sample: str) -> list[list[int]]:
        """One tokenization of the whole text; each token goes to the segment its characters lie in.
        A token that spans a segment boundary means prompt and reply cannot be told apart."""
        enc = self.tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)
        ends, total = [], 0
        for text in texts:
            total += len(text)
            ends.append(total)
        pieces: list[list[int]] = [[] for _ in texts]
        seg = 0
        for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
            while seg < len(texts) - 1 and start >= ends[seg]:
                seg += 1
            if end > ends[seg] and seg < len(texts) - 1:
                raise LabelError(
                    f"sample {sample}: a token spans the boundary before segment {seg + 1} "
                    f"({texts[seg + 1][:40]!r}), so prompt and reply tokens cannot be told apart"
                )
            pieces[seg].append(token)
        return pieces

    def _split_by_prefixes(self, texts: list[str], sample: str) -> list[list[int]]:
        """For tokenizers without offsets: each segment's ids are what it adds to the ids of the text
        before it, which must stay a prefix (quadratic in the number of segments, hence the fallback)."""
        pieces: list[list[int]] = []
        prev: list[int] = []
        cumulative = ""
        for i, text in enumerate(texts):
            cumulative += text
            ids = self.tokenizer(cumulative, add_special_tokens=False).input_ids
            if ids[: len(prev)] != prev:
                raise LabelError(
                    f"sample {sample}: the tokenizer merges text across the boundary before segment {i} "
                    f"({text[:40]!r}), so prompt and reply tokens cannot be told apart"
                )
            pieces.append(ids[len(prev):])
            prev = ids
        return pieces

    def encode(self, messages: list[Message], sample: str = "?", add_generation_prompt: bool = False,
               image_tokens: Sequence[int] | None = None, check_labels: bool = True) -> Encoded:
        """Ids and labels for a conversation. With add_generation_prompt, ids end where the reply begins.
        `image_tokens`: each image's token count, in placeholder order (`hd`/`anyres` image modes, where
        it depends on the image's size); by default every image has `num_image_tokens`.
        check_labels=False (inference prompts): no label is built or checked, so earlier assistant turns
        may hold any text (e.g. "blue </s> red"); each text run is tokenized whole."""
        segments = self.format.render(messages, self.tokenizer, add_generation_prompt)
        # Split on image placeholders: text runs are tokenized on their own, as LLaVA does.
        runs: list[list[Segment] | None] = [[]]  # None marks an image
        for seg in segments:
            parts = seg.text.split(IMAGE_PLACEHOLDER)
            if len(parts) > 1 and seg.supervised:
                raise LabelError(f"sample {sample}: an assistant reply contains {IMAGE_PLACEHOLDER}")
            for j, part in enumerate(parts):
                if j:
                    runs += [None, []]
                if part or seg.supervised:
                    runs[-1].append(Segment(part, seg.reply))  # type: ignore[union-attr]

        n_placeholders = sum(1 for run in runs if run is None)
        counts = [self.num_image_tokens] * n_placeholders if image_tokens is None else list(image_tokens)
        if len(counts) != n_placeholders:
            raise DataError(f"sample {sample}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for "
                            f"{len(counts)} image(s); each image needs exactly one placeholder",
                            "image/placeholder mismatch")
        if self.max_length is not None and sum(counts) + len(self.bos) > self.max_length:
            raise DataError(f"sample {sample}: its {len(counts)} image(s) take {sum(counts)} tokens "
                            f"({counts}), more than model_max_length={self.max_length}; raise model_max_length, "
                            "use fewer tiles (vision.max_tiles, hd_grid) or fewer images",
                            "image tokens over model_max_length")
        input_ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
        image_runs: list[tuple[int, int]] = []  # (start, length) of each image's ids
        for run in runs:
            if run is None:
                n = counts[len(image_runs)]
                image_runs.append((len(input_ids), n))
                input_ids += [IMAGE_TOKEN_ID] * n
                labels += [IGNORE_INDEX] * n
                continue
            if not check_labels:  # one piece per run: no reply boundary to keep, nothing to check
                whole = self._tokenize_run(["".join(seg.text for seg in run)], sample, bool(image_runs)) if run else []
                ids = whole[0] if whole else []
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
                continue
            pieces = self._tokenize_run([s.text for s in run], sample, bool(image_runs)) if run else []
            for seg, ids in zip(run, pieces):
                if seg.supervised:
                    decoded = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    if decoded.strip() != (seg.reply or "").strip():
                        raise LabelError(
                            f"sample {sample}: the supervised tokens decode to {decoded.strip()[:60]!r}, "
                            f"not to the reply {(seg.reply or '').strip()[:60]!r}"
                        )
                input_ids += ids
                labels += ids if seg.supervised else [IGNORE_INDEX] * len(ids)
        return self._truncate(input_ids, labels, image_runs)

    def _truncate(self, input_ids: list[int], labels: list[int], image_runs: list[tuple[int, int]]) -> Encoded:
        n_images = len(image_runs)
        if self.max_length is None or len(input_ids) <= self.max_length:
            return Encoded(input_ids, labels, n_images)
        cut = self.max_length
        # Never cut inside an image's token run: the image would have fewer slots than features.
        for start, n in image_runs:
            if start < cut < start + n:
                cut = start
        kept = sum(1 for s, n in image_runs if s + n <= cut)
        lost = sum(1 for x in labels[cut:] if x != IGNORE_INDEX)
        return Encoded(input_ids[:cut], labels[:cut], kept, truncated=True, supervised_cut=lost)
