"""Stand-ins for the pretrained parts LLaVA starts from, made only because none can be downloaded.

- a byte-level BPE tokenizer trained on the world's text (ChatML chat template, as SmolLM2 uses);
- a small CLIP (transformers' `CLIPModel`) trained contrastively on the world's image-caption pairs,
  as CLIP was trained on web image-text pairs;
- a small Llama-architecture causal LM pretrained on the world's text.

Each is saved as an ordinary Hugging Face folder and from then on loaded by the code that loads
real CLIP and Vicuna checkpoints. The pretraining loops here are deliberately minimal: they make the
inputs of the method, they are not part of it (vistune's own training loop is `train.loop`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from vistune.chat.formats import chatml_template
from vistune.tokens import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant that can see images."
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
Regions = list[list[tuple[list[int], str]]]  # per image: (patch indices a box covers, the box's caption)


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 2048) -> Path:
    """Byte-level BPE (any text encodes, no unknown token) with `<|im_end|>` as EOS, like SmolLM2."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chat_words = ["system", "user", "assistant", SYSTEM_PROMPT, IMAGE_PLACEHOLDER]
    tok.train_from_iterator(texts + chat_words * 100, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", model_max_length=1024)
    fast.chat_template = chatml_template(SYSTEM_PROMPT)
    fast.save_pretrained(out)
    return out


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], loss_of: Callable[..., torch.Tensor],
         steps: int, lr: float, desc: str) -> list[float]:
    """AdamW with warmup + cosine decay; returns the loss per step (for the report's curves)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for _ in bar:
        loss = loss_of(model, **next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def load_pixels(image_folder: Path, file_names: list[str], image_size: int):  # noqa: ANN202
    """All images of a split as one normalised tensor [N, 3, H, W], CLIP's published mean/std."""
    import numpy as np
    from PIL import Image

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    out = []
    for name in file_names:
        with Image.open(image_folder / name) as im:
            arr = np.asarray(im.convert("RGB").resize((image_size, image_size)), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
    return torch.stack(out)


def box_regions(instances_file: Path, images: list[dict], image_size: int, patch_size: int) -> Regions:
    """Per image (in the order of `images`, COCO image records), each box of a COCO instances file as
    (the row-major indices of the patches whose centres it covers, or the patch at its centre, and
    the caption "A <category name>."), for the CLIP stand-in's region-text loss."""
    inst = json.loads(instances_file.read_text())
    categories = {c["id"]: c["name"] for c in inst["categories"]}
    size = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
    grid = image_size // patch_size
    by_image: dict[int, list[tuple[list[int], str]]] = {}
    for a in inst["annotations"]:
        w, h = size[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        sx, sy = image_size / w, image_size / h  # the box in the encoder's input pixels
        x0, y0, x1, y1 = x * sx, y * sy, (x + bw) * sx, (y + bh) * sy
        centres = [(r, c) for r in range(grid) for c in range(grid)
                   if x0 <= (c + 0.5) * patch_size < x1 and y0 <= (r + 0.5) * patch_size < y1]
        if not centres:
            centres = [(min(grid - 1, int((y0 + y1) / 2 // patch_size)), min(grid - 1, int((x0 + x1) / 2 // patch_size)))]
        name = categories[a["category_id"]]
        by_image.setdefault(a["image_id"], []).append(
            ([r * grid + c for r, c in centres], f"{'An' if name[0] in 'aeiou' else 'A'} {name}."))
    return [by_image.get(im["id"], []) for im in images]


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------

_CLIP_TEXT_LEN = 48  # tokens; captions of this world are shorter


def _clip_config(tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int, width: int,
                 layers: int) -> CLIPConfig:
    """A small CLIP: a 2-layer text tower and a `layers`-layer ViT, both `width` wide."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": width * 2,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": _CLIP_TEXT_LEN,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id},
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": width,
                       "intermediate_size": width * 2, "num_hidden_layers": layers, "num_attention_heads": 4},
        projection_dim=width,
    )


def _clip_text(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids [N, L] and mask; CLIP pools the text at its first EOS token, so every caption ends with one."""
    enc = tokenizer([t + tokenizer.eos_token for t in texts], padding="max_length", truncation=True,
                    max_length=_CLIP_TEXT_LEN, return_tensors="pt")
    enc["input_ids"][:, -1] = torch.where(enc["attention_mask"][:, -1] == 1, tokenizer.eos_token_id,
                                          enc["input_ids"][:, -1])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _region_batch(tokenizer: PreTrainedTokenizerBase, idx: list[int], regions: Regions,
                  n_patches: int) -> dict[str, torch.Tensor]:
    """The batch's boxes, one per distinct caption (equal captions would be false negatives): the
    averaging masks [K, B, P] over each box's patch tokens, and the captions' token ids."""
    picked: dict[str, tuple[int, list[int]]] = {}  # caption -> (row in batch, patches)
    for row, i in enumerate(idx):
        for patches, text in regions[i]:
            picked.setdefault(text, (row, patches))
    masks = torch.zeros(len(picked), len(idx), n_patches)  # [K, B, P]
    for k, (row, patches) in enumerate(picked.values()):
        masks[k, row, patches] = 1.0 / len(patches)
    text = _clip_text(tokenizer, list(picked))
    return {"region_masks": masks, "region_ids": text["input_ids"], "region_attention": text["attention_mask"]}


def _clip_loss(m: CLIPModel, region_layer: int, region_masks: torch.Tensor | None = None,
               region_ids: torch.Tensor | None = None, region_attention: torch.Tensor | None = None,
               **batch: torch.Tensor) -> torch.Tensor:
    """CLIP's image-text loss, plus (with regions) the same symmetric loss over box-caption pairs."""
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    out = m(**batch, return_loss=True, output_hidden_states=region_masks is not None)
    if region_masks is None:
        return out.loss
    tokens = out.vision_model_output.hidden_states[region_layer][:, 1:]  # [B, P, D], the class token left out
    pooled = torch.einsum("kbp,bpd->kd", region_masks, tokens)  # [K, D]
    region = m.visual_projection(m.vision_model.post_layernorm(pooled))
    region_text = m.get_text_features(input_ids=region_ids, attention_mask=region_attention).pooler_output
    region, region_text = region / region.norm(dim=-1, keepdim=True), region_text / region_text.norm(dim=-1, keepdim=True)
    return out.loss + image_text_contrastive_loss(m.logit_scale.exp() * region_text @ region.T)  # [K texts, K boxes]


def _save_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, out: Path, image_size: int) -> None:
    """The tower as an HF folder with an image processor using CLIP's published normalisation."""
    from transformers import CLIPImageProcessor

    model.save_pretrained(out)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=mean, image_std=std).save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_clip(pixels: torch.Tensor, captions: list[list[str]], tokenizer_dir: Path, out: Path, *,
               image_size: int, patch_size: int = 8, width: int = 128, layers: int = 4, steps: int = 400,
               batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
               regions: Regions | None = None, region_layer: int = -2) -> dict:
    """Contrastive image-text training of a small CLIP; pixels [N, 3, H, W] already normalised the
    way the saved image processor will normalise them. Returns the loss curve and held-out stats.

    `regions[i]`: image i's boxes as (patch indices the box covers, the box's caption). With them,
    each batch adds a region-text contrastive loss, as RegionCLIP does: a box's feature is the mean
    of its patch tokens at `region_layer` (the layer LLaVA reads, by default), through the tower's
    final norm and projection, matched against its caption among the batch's other region captions.
    Scene captions alone teach a tower this small, in minutes, which colours a scene holds but hardly
    which shape each object has (a linear probe on an object's patch reads its colour, not its shape);
    a real CLIP's patch tokens carry what each object is."""
    from transformers import AutoTokenizer, CLIPModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = CLIPModel(_clip_config(tokenizer, image_size, patch_size, width, layers))
    n_val = min(max(64, len(captions) // 20), len(captions) // 4)  # held out for the retrieval check
    train_idx = list(range(n_val, len(captions)))
    n_patches = (image_size // patch_size) ** 2

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            idx = rng.sample(train_idx, min(batch_size, len(train_idx)))
            batch = {"pixel_values": pixels[idx], **_clip_text(tokenizer, [rng.choice(captions[i]) for i in idx])}
            yield {**batch, **_region_batch(tokenizer, idx, regions, n_patches)} if regions else batch

    losses = _fit(model, batches(), lambda m, **b: _clip_loss(m, region_layer, **b), steps, lr, "clip")
    with torch.no_grad():  # held-out image -> caption retrieval among the validation images: how well it sees
        idx = list(range(n_val))
        logits = model(pixel_values=pixels[idx], **_clip_text(tokenizer, [captions[i][0] for i in idx])).logits_per_image
        top1 = (logits.argmax(-1) == torch.arange(len(idx))).float().mean().item()
    _save_clip(model, tokenizer, out, image_size)
    return {"losses": losses, "val_retrieval_top1": top1, "val_images": n_val,
            "parameters": sum(p.numel() for p in model.vision_model.parameters())}


# --------------------------------------------------------------------------------------------------
# The language model
# --------------------------------------------------------------------------------------------------

def lm_config(tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int = 4) -> LlamaConfig:
    """The stand-in LLM's architecture: a small Llama over `tokenizer`'s vocabulary, embeddings tied."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def train_lm(texts: list[str], tokenizer_dir: Path, out: Path, *, hidden: int = 256, layers: int = 4,
             steps: int = 300, batch_size: int = 32, seq_len: int = 128, lr: float = 2e-3, seed: int = 0) -> dict:
    """Next-token pretraining of a small Llama on the world's text, packed into fixed-length rows."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    rows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)  # [R, L]
    model = LlamaForCausalLM(lm_config(tokenizer, hidden, layers))

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            idx = [rng.randrange(len(rows)) for _ in range(batch_size)]
            yield {"input_ids": rows[idx]}

    def loss_of(m: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=input_ids, labels=input_ids).loss

    losses = _fit(model, batches(), loss_of, steps, lr, "lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"losses": losses, "corpus_tokens": len(stream), "trained_tokens": steps * batch_size * seq_len,
            "parameters": model.num_parameters()}
