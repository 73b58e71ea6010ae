"""Can a stand-in-sized LLM learn to read the demo's questions off a text description? A diagnostic.

`demo_oracle.py` shows the demo's LLM does not learn, from perfect image tokens, the questions whose
answer needs the question and the image together (existence, shape, position). This asks the same of
text, the skill a real LLM brings to LLaVA: a fresh Llama the size of the demo's stand-in (random
weights) trains on unlimited synthetic scenes, each given as its "From left to right: ..." caption
(every object's colour and shape, in order) followed by one of the world's questions and LLaVA-1.5's
short-answer line, in the tokenizer's chat template; the loss is on the answer only. Every
`--eval-every` steps it prints first-token accuracy, per type, on 400 held-out questions of other scenes.

    python benchmarks/demo_reading.py --tokenizer runs/demo/parts/tokenizer --steps 4000 --eval-every 500 \
        --save runs/reader

The loop is deliberately minimal, like the demo's stand-in pretraining (`vistune.demo.standins`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from vistune.demo import world
from vistune.demo.evaluate import reading_request
from vistune.demo.standins import _cosine, lm_config

Example = tuple[list[int], list[int], int]  # (input ids, labels, prompt length)


def scene_questions(rng: random.Random, scene_id: int) -> tuple[str, list[tuple[str, str, str]]]:
    """A random scene's left-to-right caption and its (type, question, answer) triples."""
    scene = world.sample_scene(rng, scene_id)
    caption = next(c for c in world.captions(scene, rng, 6) if c.startswith("From left"))
    return caption, world.questions(scene, rng)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, 
                   help="the demo's tokenizer (vistune demo's OUT/parts/tokenizer)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=192, help="the demo's stand-in: 192")
    p.add_argument("--layers", type=int, default=3, help="the demo's stand-in: 3")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--output", type=Path, default=None, help="write the accuracy curve here as JSON")
    p.add_argument("--save", type=Path, default=None, help="save the trained LLM here (an HF folder, tokenizer too)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)

    def encode(caption: str, question: str, answer: str) -> Example:
        prompt = tok.apply_chat_template([{"role": "user", "content": reading_request(caption, question)}],
                                         tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, len(prompt_ids)

    def stream() -> Iterator[Example]:
        """Training examples of ever new scenes (ids from 1): no scene is seen twice."""
        rng, scene_id = random.Random(1), 0
        while True:
            scene_id += 1
            caption, qs = scene_questions(rng, scene_id)
            for _, q, a in qs:
                yield encode(caption, q, a)

    held_out: list[tuple[Example, str]] = []  # scene ids from 10**6 + 1, another random stream
    rng, scene_id = random.Random(999), 10**6
    while len(held_out) < 400:
        scene_id += 1
        caption, qs = scene_questions(rng, scene_id)
        held_out += [(encode(caption, q, a), t) for t, q, a in qs]

    model = LlamaForCausalLM(lm_config(tok, args.hidden, args.layers, args.heads))  # the stand-in's architecture

    def pad(batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input ids, labels, attention mask, each [B, T] (right-padded)."""
        n = max(len(ids) for ids, _, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (n - len(x)) for x, _, _ in batch])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y, _ in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _, _ in batch])
        return ids, labels, mask

    @torch.no_grad()
    def accuracy() -> tuple[float, dict[str, float]]:
        model.eval()
        right: dict[str, list[bool]] = {}
        for s in range(0, len(held_out), 100):
            chunk = held_out[s:s + 100]
            ids, _, mask = pad([e for e, _ in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits
            for k, ((x, _, n_prompt), qtype) in enumerate(chunk):
                right.setdefault(qtype, []).append(logits[k, n_prompt - 1].argmax().item() == x[n_prompt])
        model.train()
        total = sum(sum(v) for v in right.values()) / len(held_out)
        return total, {t: sum(v) / len(v) for t, v in right.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, args.steps, warmup))
    train, curve, losses, start = stream(), [], [], time.perf_counter()
    print(f"{len(held_out)} held-out questions; a stand-in LLM of {model.num_parameters():,} parameters", flush=True)
    for step in range(1, args.steps + 1):
        ids, labels, mask = pad([next(train) for _ in range(args.batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % args.eval_every == 0:
            total, per_type = accuracy()
            curve.append({"step": step, "accuracy": total, "per_type": per_type,
                          "loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": round(time.perf_counter() - start)})
            types = ", ".join(f"{t} {a:.2f}" for t, a in per_type.items())
            print(f"step {step}: held-out accuracy {total:.3f} ({types}), loss {curve[-1]['loss']:.3f}, {curve[-1]['seconds']} s", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}, indent=1))
    if args.save:  # e.g. to try it as the LLM of demo_oracle.py
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)


if __name__ == "__main__":
    main()
