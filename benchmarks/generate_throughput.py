"""Decode throughput: vistune's engine vs transformers' `LlavaForConditionalGeneration.generate`, same weights.

    python benchmarks/generate_throughput.py                        # tiny model built here, CPU
    python benchmarks/generate_throughput.py --model runs/x/finetune --device cuda --dtype bf16 --name 7b

The vistune checkpoint (by default the test suite's tiny CLIP + Llama, finetuned 10 steps) is exported
with `vistune convert --to llava-hf` (`write_llava_hf`), so transformers runs exactly the same weights.
Each prompt is one image and a question; both sides decode greedily and exactly `--new-tokens` tokens
(vistune: `ignore_eos`; transformers: `min_new_tokens` = `max_new_tokens`), at batch 1 and at
`--batch` prompts in one call (left-padded). Reported: generated tokens/s (batch x new tokens / wall
time of the call, prefill included), median over `--repeats` calls after one warm-up call, and the
ratio. Results go to benchmarks/results/generate_throughput-<name>.json with machine, versions, command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

QUESTIONS = ["What colour is the shape?", "Describe the image briefly.", "Where is the shape?",
             "Is the shape big or small?", "What do you see in this image?", "What colour is the background?",
             "Describe the picture in detail.", "How many shapes are there?"]


def timed(fn, repeats: int, sync=lambda: None) -> float:  # noqa: ANN001
    """Median wall time of `fn` after a warm-up call. `sync` waits for the device (torch.cuda.synchronize):
    CUDA kernels run asynchronously, so without it a timer could stop before the work it times is done, or
    start while the previous call's work is still running."""
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a vistune checkpoint (default: a tiny one built here)")
    p.add_argument("--image", type=Path, default=None, help="image for the prompts (default: the tiny data set's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="tiny")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from PIL import Image
    from serve_load import build_tiny
    from train_tiny import environment
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vistune.chat.formats import Message
    from vistune.convert.llava_hf import write_llava_hf
    from vistune.infer.engine import Engine, Job
    from vistune.infer.rows import Sampling
    from vistune.model.checkpoint import load_checkpoint

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(prefix="vistune-generate-") as tmp:
        root = Path(tmp)
        model, image_path = (args.model, args.image)
        if model is None:
            model, tiny_image = build_tiny(root / "tiny")
            image_path = image_path or tiny_image
        if image_path is None:
            sys.exit("--image is needed with --model")
        write_llava_hf(load_checkpoint(model), root / "hf")
        image = Image.open(image_path).convert("RGB")

        engine = Engine(load_checkpoint(model, dtype=dtype, device=args.device))
        hf = LlavaForConditionalGeneration.from_pretrained(str(root / "hf"), dtype=dtype).to(args.device).eval()
        processor = AutoProcessor.from_pretrained(str(root / "hf"))
        processor.tokenizer.padding_side = "left"
        n = args.new_tokens
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        def vistune_call(b: int) -> None:
            jobs = [Job(engine.prepare([Message("user", QUESTIONS[i % len(QUESTIONS)])], [image]),
                        Sampling(max_new_tokens=n, ignore_eos=True)) for i in range(b)]
            done = engine.run(jobs)
            assert all(c.completion_tokens == n for c in done), [c.completion_tokens for c in done]

        def hf_call(b: int) -> None:
            prompts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
                add_generation_prompt=True) for i in range(b)]
            inputs = processor(images=[image] * b, text=prompts, return_tensors="pt", padding=True).to(args.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert out.shape[1] - inputs["input_ids"].shape[1] == n

        results: dict[str, dict] = {}
        for b in (1, args.batch):
            row = {}
            for name, call in (("transformers", hf_call), ("vistune", vistune_call)):
                secs = timed(lambda call=call, b=b: call(b), args.repeats, sync)
                row[name] = {"seconds_per_call": secs, "tokens_per_s": b * n / secs}
            row["ratio_vistune_over_transformers"] = row["vistune"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            results[f"batch_{b}"] = row
            print(f"batch {b:>2}: transformers {row['transformers']['tokens_per_s']:8.1f} tok/s   "
                  f"vistune {row['vistune']['tokens_per_s']:8.1f} tok/s   ratio {row['ratio_vistune_over_transformers']:.2f}x",
                  flush=True)

    machine, versions = environment()
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    record = {"benchmark": "generate_throughput", "model": str(args.model or "tiny (vistune.testing, 10 steps)"),
              "device": args.device, "dtype": args.dtype, "new_tokens": n, "batch": args.batch,
              "repeats": args.repeats, "results": results, "machine": machine, "versions": versions,
              "command": shlex.join([sys.executable, *sys.argv])}
    out = args.output or REPO / "benchmarks" / "results" / f"generate_throughput-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
