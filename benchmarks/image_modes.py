"""What each image mode costs: image tokens per image, and CPU time per training sample.

    python benchmarks/image_modes.py                     # tiny CLIP (32 px) + tiny Llama, 12 steps per mode
    python benchmarks/image_modes.py --steps 30 --threads 2

Two parts:

1. Arithmetic, no model: image tokens per image for the real LLaVA shapes, CLIP ViT-L/14-336
   (24 x 24 = 576 patches per tile): `single` (LLaVA-1.5), `hd` with a 2x2 grid (LLaVA-1.5-HD), and
   `anyres` with LLaVA-NeXT's pinpoints (336x672, 672x336, 672x672, 1008x336, 336x1008) for a few
   image sizes. These come from `ImageLayout.num_tokens`, which the test suite checks against
   transformers' LlavaNextProcessor.
2. Measured on tiny parts (the test suite's builders, vistune.testing): a 32 px CLIP with 8 px
   patches (16 tokens per tile) and a 2-layer Llama; `hd` with a 2x2 grid; `anyres` with the default
   pinpoints, LLaVA-NeXT's set scaled to 32 px (1x2, 2x1, 2x2, 3x1, 1x3 tiles). Per mode: the tokens per
   image for a few sizes, then `--steps` optimizer steps of projector + LLM training (fp32, AdamW,
   micro-batch 4) on the fixture data set (12 image samples of 6 sizes, 4 text-only), timed as data
   preparation (image loading, tiling, tokenization: `SupervisedDataset`) and model step
   (forward, backward, optimizer) in process CPU seconds and wall seconds per sample: the median over
   steps, the three modes interleaved step by step (the numbers are for a shared machine).

Results are printed and written to benchmarks/results/image_modes-tiny.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

MODES = ("single", "hd", "anyres")
REAL_SIZES = [(336, 336), (640, 480), (480, 640), (1024, 768), (1000, 300), (1920, 1080)]  # (width, height)
TINY_SIZES = [(32, 32), (64, 48), (40, 20), (20, 40), (96, 32)]


def real_counts() -> dict:
    from vistune.model.tiling import ImageLayout

    out: dict = {"encoder": "CLIP ViT-L/14-336 (24x24 patches per tile)", "single": 576,
                 "hd_2x2": ImageLayout.build("hd", 336, 14, 576, hd_grid=(2, 2)).num_tokens(336, 336),
                 "anyres": {}}
    layout = ImageLayout.build("anyres", 336, 14, 576)
    out["anyres_pinpoints"] = [list(p) for p in layout.pinpoints]
    for w, h in REAL_SIZES:
        rows, cols = layout.grid(h, w)
        out["anyres"][f"{w}x{h}"] = {"grid": f"{rows}x{cols}", "tiles_encoded": layout.num_tiles(h, w),
                                     "tokens": layout.num_tokens(h, w)}
    return out


class ModeRun:
    """One mode's model, data set and optimizer, stepped a few samples at a time."""

    def __init__(self, mode: str, clip: Path, llama: Path, data: Path, micro: int) -> None:
        import torch

        from vistune.chat.encode import ChatEncoder
        from vistune.chat.formats import get_format
        from vistune.config import LLMConfig, PartsConfig, VisionConfig
        from vistune.data.dataset import SupervisedDataset
        from vistune.data.records import Problems, load_samples
        from vistune.model.checkpoint import build_model
        from vistune.model.llm import load_tokenizer
        from vistune.model.vision import load_image_processor
        from vistune.train.parts import apply_parts, param_groups

        vision = VisionConfig(path=str(clip), image_mode=mode)  # type: ignore[arg-type]
        torch.manual_seed(0)
        self.model = build_model(vision, LLMConfig(path=str(llama)), "mlp2x_gelu")
        apply_parts(self.model, PartsConfig(projector="full", llm="full"), None, False)  # type: ignore[arg-type]
        self.model.train()
        self.tokenizer = load_tokenizer(llama)
        encoder = ChatEncoder(self.tokenizer, get_format("chat_template"), self.model.num_image_tokens, 2048)
        samples = load_samples(data / "train.json", data / "images", False, Problems())
        self.dataset = SupervisedDataset(samples, encoder, load_image_processor(clip), "pad", False,
                                         layout=self.model.layout)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 1e-4, None, 0.0), lr=1e-4)
        self.micro, self.next = micro, 0
        self.per_step: list[tuple[float, float, float, float]] = []  # data cpu, data wall, model cpu, model wall
        self.image_tokens = 0

    def step(self, record: bool) -> None:
        from vistune.data.dataset import collate

        idx = [(self.next + k) % len(self.dataset) for k in range(self.micro)]
        self.next += self.micro
        c0, w0 = time.process_time(), time.perf_counter()
        batch = collate([self.dataset[i] for i in idx], self.tokenizer.pad_token_id)
        c1, w1 = time.process_time(), time.perf_counter()
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], labels=batch["labels"])
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        c2, w2 = time.process_time(), time.perf_counter()
        if record:
            self.per_step.append((c1 - c0, w1 - w0, c2 - c1, w2 - w1))
            self.image_tokens += int((batch["input_ids"] < 0).sum())

    def summary(self) -> dict:
        import statistics

        n = len(self.per_step) * self.micro

        def med(k: int) -> float:  # median over steps, per sample: robust to other jobs on a shared machine
            return round(statistics.median(s[k] for s in self.per_step) / self.micro, 5)

        return {
            "tokens_per_image": {f"{w}x{h}": self.model.layout.num_tokens(h, w) for w, h in TINY_SIZES},
            "mean_image_tokens_per_sample": round(self.image_tokens / n, 1),
            "samples_timed": n,
            "cpu_s_per_sample_median": {"data": med(0), "model_step": med(2), "total": round(med(0) + med(2), 5)},
            "wall_s_per_sample_median": {"data": med(1), "model_step": med(3), "total": round(med(1) + med(3), 5)},
        }


def main() -> None:
    from vistune.files import write_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per mode (after one warm-up)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "image_modes-tiny.json")
    args = parser.parse_args()

    import torch
    import transformers
    from vistune.testing import build_bpe_tokenizer, build_clip, build_dataset, build_llama

    import vistune

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "image_modes", "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "settings": {"steps": args.steps, "micro_batch_size": args.micro_batch_size,
                                 "threads": torch.get_num_threads(), "precision": "fp32",
                                 "tiny_anyres_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
                                 "tiny_hd_grid": [2, 2]},
                    "real_llava_shapes": real_counts(), "tiny": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip, data = build_clip(root / "clip"), build_dataset(root / "data")
        llama = build_llama(root / "llama", build_bpe_tokenizer(root / "tokenizer"))
        runs = {mode: ModeRun(mode, clip, llama, data, args.micro_batch_size) for mode in MODES}
        result["load_average_before"] = os.getloadavg()
        for run in runs.values():
            run.step(record=False)  # warm-up
        for _ in range(args.steps):  # modes interleaved step by step, so load from other jobs hits all alike
            for run in runs.values():
                run.step(record=True)
        result["load_average_after"] = os.getloadavg()
        result["tiny"] = {mode: run.summary() for mode, run in runs.items()}
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "python": platform.python_version()}
    result["versions"] = {"vistune": vistune.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__}

    real = result["real_llava_shapes"]
    print(f"CLIP-L/14-336: single {real['single']} tokens, hd 2x2 {real['hd_2x2']} tokens; anyres:")
    for size, row in real["anyres"].items():
        print(f"  {size:>10}  grid {row['grid']}  {row['tiles_encoded']} tiles  {row['tokens']} tokens")
    print(f"tiny (32 px CLIP, 16 tokens per tile), {args.steps} steps x {args.micro_batch_size} samples:")
    print(f"  {'mode':<7} {'tokens/image by size':<48} {'img tok/sample':>14} {'CPU s/sample':>12} {'wall s/sample':>13}")
    for mode, row in result["tiny"].items():
        sizes = ", ".join(f"{k}:{v}" for k, v in row["tokens_per_image"].items())
        print(f"  {mode:<7} {sizes:<48} {row['mean_image_tokens_per_sample']:>14} "
              f"{row['cpu_s_per_sample_median']['total']:>12.4f} {row['wall_s_per_sample_median']['total']:>13.4f}")
    write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
