"""Training throughput: vistune vs transformers' `LlavaForConditionalGeneration` + HF `Trainer`, in one run.

    python benchmarks/train_throughput.py                                  # CPU, tiny shape
    python benchmarks/train_throughput.py --device cuda --shape llava-1.5-7b --llm-mode lora
    python benchmarks/train_throughput.py --device cuda --shape 1b

Three systems train LLaVA-1.5's stage 2 (vision tower frozen, projector + LLM trained: `full`, or LoRA on
the LLM) for one epoch over the same synthetic data set, each in its own subprocess (so peak memory is
its own; the parts are built in one too, so the parent never holds a model or GPU memory), and the parent
prints and saves them and each vistune system's ratio to the baseline:

- **baseline**: what a user would otherwise write. `LlavaForConditionalGeneration` (same vision config,
  same LLaMA config, same projector), the HF `Trainer`, a collator that pads each batch to its longest
  sample, no packing, no length grouping; the samples are tokenised by the same encoder as vistune's
  (so both see identical token ids), with LLaVA's `<image>` id expanded to the image-token run as
  `LlavaProcessor` does. In LoRA mode under bf16 its frozen LLM is held in bf16, as vistune holds it.
- **vistune-padded**: `vistune.train.loop.train_stage` exactly as `vistune train` runs it, batching as the
  baseline does (`--batch-size` samples padded per micro-batch, no length grouping): the same work, so the
  ratio is the code's.
- **vistune-packed**: the same with sequence packing (`data.packing`, rows of `--pack-length` tokens, `--rows`
  per micro-batch): the ratio adds what packing saves (no padding).

The data mimic LLaVA-1.5's 665k mix: ~90% samples with one image (the vision tower's full token run:
576 for CLIP ViT-L/14-336) and a text part of very different lengths (short VQA answers, medium
conversations, long detailed descriptions), ~10% text-only conversations (ShareGPT), random words from
the test tokenizer's vocabulary. Parts have random weights (throughput does not depend on them).

Reported per system, over the steps after the first `--warmup-steps` (default 1, which also starts the data
loader; 3 with --compile, whose first steps compile), dropped from every system alike: samples/s, tokens/s
(text + image tokens, padding excluded), peak memory (CUDA: max allocated; CPU: peak RSS of the subprocess),
and MFU. MFU counts the model FLOPs of the real tokens (never padding),
the same for both systems, PaLM's convention (Chowdhery et al. 2022, app. B):

    per sample of T tokens (I of them image tokens):
      LLM         (6 if the LLM trains fully, else 4) * N_llm * T  +  12 * L * d * T^2   (attention)
      projector   6 * N_proj * I
      vision      2 * N_vis * P   per image (P patches incl. CLS; forward only, frozen)
    FLOPs/s = mean FLOPs per sample * samples/s;  MFU = FLOPs/s / peak (dense bf16 peak of the GPU, by
    its name, `PEAK_TFLOPS`: H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, H100/H200 NVL 835, A100 312; or
    --peak-tflops).  A frozen LLM part still back-propagates activations (4N, not 6N); LoRA's own
    weights are ignored (<1%).
On CPU there is no well-defined peak: MFU is only given with --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

SHAPES: dict[str, dict] = {
    # vision: CLIP vision config; llm: LLaMA config; text: word-count scale of the data; max_len: model_max_length
    "tiny": {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=64, patch_size=8),  # 64 patches
             "llm": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024),
             "text_scale": 0.25, "max_len": 384},
    "1b": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14),  # CLIP ViT-L/14-336: 576 patches
           "llm": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),  # LLaMA-3.2-1B-like, LLaMA-2 vocabulary
           "text_scale": 1.0, "max_len": 2048},
    "llava-1.5-7b": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, image_size=336, patch_size=14),
                     "llm": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),  # Vicuna-7B
                     "text_scale": 1.0, "max_len": 2048},
}
# Dense bf16 tensor-core peaks (NVIDIA datasheets; the sparse figures are twice these), matched in this order
# against torch.cuda.get_device_name(): the PCIe and NVL cards run at lower clocks and power than the SXM ones
# ("NVIDIA H100 80GB HBM3" is SXM; "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" name themselves).
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H800 PCIe", 756.0),
    ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
]
MFU_FORMULA = ("per sample of T tokens, I image tokens: (6 if the LLM trains fully else 4) * N_llm * T + 12 * L * d * "
               "T^2 + 6 * N_proj * I, plus per image 2 * N_vis * P + 4 * L_vis * d_vis * P^2 (vision forward, P "
               "patches); MFU = mean FLOPs per sample * samples/s / dense bf16 peak")
SYSTEMS = ("baseline", "vistune-padded", "vistune-packed")


def peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name (`PEAK_TFLOPS`), None when unknown."""
    return next((v for k, v in PEAK_TFLOPS if k in gpu_name), None)


# ----------------------------------------------------------------------------------------------- parts

def build_parts(root: Path, shape: str, device: str) -> dict:
    """Random-weight CLIP vision tower + LLaMA LLM (with the test BPE tokenizer) saved as HF folders."""
    import torch
    from vistune.testing import build_bpe_tokenizer
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    spec = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(str(build_bpe_tokenizer(root / "tokenizer")))
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(**spec["vision"], num_channels=3)
    vision = CLIPVisionModel(vcfg)
    vision.save_pretrained(str(root / "vision"))
    size = spec["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(root / "vision"))
    lcfg = LlamaConfig(**spec["llm"], max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    big = shape != "tiny"
    with torch.device(device if big else "cpu"):  # initialising 7B parameters on a CPU takes minutes
        llm = LlamaForCausalLM(lcfg)
    llm.save_pretrained(str(root / "llm"), max_shard_size="5GB")
    if big:  # weights in bf16 on disk (half the size); both systems load them as float32 to train
        del llm
        llm = LlamaForCausalLM.from_pretrained(str(root / "llm"), dtype=torch.bfloat16)
        llm.save_pretrained(str(root / "llm"), max_shard_size="5GB")
    tok.save_pretrained(str(root / "llm"))
    return {"vision": str(root / "vision"), "llm": str(root / "llm")}


def build_data(root: Path, shape: str, n: int, seed: int) -> Path:
    """LLaVA-format records: ~90% one image + text of mixed lengths, ~10% text-only (see module doc)."""
    from vistune.testing import corpus
    from PIL import Image

    rng = random.Random(seed)
    words = sorted({w for line in corpus() for w in line.split() if w.isalpha()})
    size = SHAPES[shape]["vision"]["image_size"]
    scale = SHAPES[shape]["text_scale"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_images = 16
    for i in range(n_images):
        Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))).save(
            root / "images" / f"{i}.png")

    def text(median: float) -> str:
        k = max(2, int(rng.lognormvariate(math.log(median * scale), 0.5)))
        return " ".join(rng.choice(words) for _ in range(k))

    records = []
    for i in range(n):
        r = rng.random()
        if r < 0.10:  # text-only, long (ShareGPT-like), 1-3 rounds
            conv = []
            for _ in range(rng.randint(1, 3)):
                conv += [{"from": "human", "value": text(40)}, {"from": "gpt", "value": text(180)}]
            records.append({"id": f"t{i}", "conversations": conv})
            continue
        # with an image: short VQA (45%), multi-round conversation (35%), detailed description (10%)
        if r < 0.55:
            rounds, q, a = rng.randint(1, 4), 12, 3
        elif r < 0.90:
            rounds, q, a = rng.randint(2, 5), 15, 45
        else:
            rounds, q, a = 1, 12, 150
        conv = []
        for j in range(rounds):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + text(q)},
                     {"from": "gpt", "value": text(a)}]
        records.append({"id": f"i{i}", "image": f"{rng.randrange(n_images)}.png", "conversations": conv})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


# ----------------------------------------------------------------------------------------------- FLOPs

def sample_lengths(parts: dict, data: Path, max_len: int) -> list[tuple[int, int]]:
    """(tokens, image tokens) per sample, as both systems see them (same encoder)."""
    from vistune.chat.encode import ChatEncoder
    from vistune.chat.formats import get_format
    from vistune.data.records import Problems, load_samples
    from vistune.model.llm import load_tokenizer
    from vistune.model.vlm import IMAGE_TOKEN_ID

    n_img = _num_image_tokens(parts)
    enc = ChatEncoder(load_tokenizer(parts["llm"]), get_format("chat_template"), n_img, max_len)
    out = []
    for s in load_samples(str(data), str(data.parent / "images"), False, Problems()):
        ids = enc.encode(list(s.messages), s.id).input_ids
        out.append((len(ids), sum(1 for x in ids if x == IMAGE_TOKEN_ID)))
    return out


def _num_image_tokens(parts: dict) -> int:
    cfg = json.loads((Path(parts["vision"]) / "config.json").read_text())
    return (cfg["image_size"] // cfg["patch_size"]) ** 2


def flops_per_sample(parts: dict, lengths: list[tuple[int, int]], llm_mode: str) -> float:
    """Mean model FLOPs per sample (module docstring)."""
    v = json.loads((Path(parts["vision"]) / "config.json").read_text())
    lc = json.loads((Path(parts["llm"]) / "config.json").read_text())
    d, L, f, V = lc["hidden_size"], lc["num_hidden_layers"], lc["intermediate_size"], lc["vocab_size"]
    kv = lc.get("num_key_value_heads") or lc["num_attention_heads"]
    hd = d // lc["num_attention_heads"]
    n_llm = L * (2 * d * d + 2 * d * kv * hd + 3 * d * f) + 2 * V * d  # attention, MLP, embeddings + head
    dv, Lv, fv = v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"]
    n_vis = Lv * (4 * dv * dv + 2 * dv * fv)
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    n_proj = dv * d + d * d
    per_token = 6 if llm_mode == "full" else 4
    total = 0.0
    for t, i in lengths:
        total += per_token * n_llm * t + 12 * L * d * t * t + 6 * n_proj * i
        if i:
            total += 2 * n_vis * patches + 4 * Lv * dv * patches * patches
    return total / len(lengths)


# ----------------------------------------------------------------------------------------------- runs

def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from train_tiny import peak_rss_mib

    return peak_rss_mib()


def steady(rows: list[dict], warmup: int) -> dict:
    """Rates over the steps after the first `warmup` (all steps if there are no more)."""
    rest = rows[warmup:] or rows
    secs = sum(r["step_s"] for r in rest)
    samples = sum(r["samples"] for r in rest)
    if not samples:
        raise RuntimeError(f"no samples were counted over {len(rest)} timed steps")
    return {"steps": len(rows), "samples_trained": sum(r["samples"] for r in rows), "timed_steps": len(rest),
            "timed_s": secs, "samples_per_s": samples / secs,
            "tokens_per_s": sum(r["tokens"] for r in rest) / secs,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def run_vistune(args: argparse.Namespace, parts: dict, data: Path, work: Path) -> dict:
    """`vistune-packed` or `vistune-padded` (args.only)."""
    packing = args.only == "vistune-packed"
    import shutil

    from vistune.config import load_config
    from vistune.train.loop import train_stage

    # A fresh output folder every run: train_stage skips (and would report) a finished one.
    shutil.rmtree(work / "vistune_out", ignore_errors=True)
    stage = {
        "parts": {"projector": "full", "llm": args.llm_mode}, "format": "chat_template",
        "data": {"path": str(data), "image_folder": str(data.parent / "images"), "packing": packing,
                 "pack_length": args.pack_length, "num_workers": args.workers},
        "model_max_length": SHAPES[args.shape]["max_len"], "output_dir": str(work / "vistune_out"), "epochs": 1,
        "global_batch_size": args.rows * args.grad_accum, "micro_batch_size": args.rows, "lr": 2e-5,
        "warmup_ratio": 0.03, "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
        "loss_chunk_size": args.loss_chunk_size, "compile": args.compile, "tensorboard": False,
        "save_frozen": False, "lora": {"r": 128, "alpha": 256, "dropout": 0.05},
    }
    if not packing:  # batched like the baseline: same micro-batch in samples, padded, no length grouping
        stage["data"]["group_by_modality_length"] = False
        stage["global_batch_size"], stage["micro_batch_size"] = args.batch_size * args.grad_accum, args.batch_size
    cfg = load_config(data={"model": {"vision": {"path": parts["vision"]},
                                      "llm": {"path": parts["llm"], "attn_implementation": args.attn}},
                            "stages": {"finetune": stage}})
    train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    rows = [json.loads(x) for x in (work / "vistune_out" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["tokens"] = r["tokens_per_s"] * r["step_s"]
    return steady(rows, args.warmup_steps)


def run_baseline(args: argparse.Namespace, parts: dict, data: Path, work: Path) -> dict:
    import shutil

    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from vistune.chat.encode import ChatEncoder
    from vistune.chat.formats import get_format
    from vistune.images import load_image
    from vistune.data.records import Problems, load_samples
    from vistune.model.llm import load_tokenizer
    from vistune.model.vlm import IMAGE_TOKEN_ID

    shutil.rmtree(work / "baseline_out", ignore_errors=True)
    tok = load_tokenizer(parts["llm"])
    text_cfg = AutoConfig.from_pretrained(parts["llm"])
    image_token = text_cfg.vocab_size - 1  # an id the tokenizer never produces (LLM vocab > tokenizer's)
    n_img = _num_image_tokens(parts)
    enc = ChatEncoder(tok, get_format("chat_template"), n_img, SHAPES[args.shape]["max_len"])
    processor = AutoImageProcessor.from_pretrained(parts["vision"])
    samples = load_samples(str(data), str(data.parent / "images"), False, Problems())

    class LazyDataset(torch.utils.data.Dataset):  # tokenise and load the image per item, as LLaVA's does
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, i: int) -> dict:
            s = samples[i]
            e = enc.encode(list(s.messages), s.id)
            ids = torch.tensor(e.input_ids)
            item = {"input_ids": ids.masked_fill(ids == IMAGE_TOKEN_ID, image_token), "labels": torch.tensor(e.labels)}
            if s.images:
                item["pixel_values"] = processor(images=[load_image(s.images[0], s.id)],
                                                 return_tensors="pt")["pixel_values"]
            return item

    def collate(items: list[dict]) -> dict:  # pad to the longest in the batch (right), no packing
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), tok.pad_token_id)
        labels = torch.full((len(items), n), -100)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = it["input_ids"], it["labels"], 1
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    config = LlavaConfig(vision_config=AutoConfig.from_pretrained(parts["vision"]), text_config=text_cfg,
                         image_token_index=image_token, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=n_img)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    if args.llm_mode == "lora" and args.precision == "bf16":
        # vistune holds a frozen (LoRA) LLM in bf16 and the tower in float32: the same here, or the baseline
        # would pay for float32 weights that nothing trains.
        model.model.language_model.to(torch.bfloat16)
        model.lm_head.to(torch.bfloat16)
    if args.llm_mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=128, lora_alpha=256, lora_dropout=0.05, modules_to_save=["multi_modal_projector"],
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))

    rows: list[dict] = []
    # Counted where the batches are trained, in this process: the collator runs in the loader's worker
    # processes when --workers > 0, where counters would stay at 0 here.
    counters = {"samples": 0, "tokens": 0}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kw):  # noqa: ANN001, ANN202 (Trainer's own signature)
            counters["samples"] += len(inputs["input_ids"])
            counters["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kw)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t, self.seen = time.perf_counter(), dict(counters)

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            rows.append({"step_s": now - self.t, "samples": counters["samples"] - self.seen["samples"],
                         "tokens": counters["tokens"] - self.seen["tokens"], "loss": None})
            self.t, self.seen = now, dict(counters)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs and rows:
                rows[-1]["loss"] = logs["loss"]

    targs = TrainingArguments(
        output_dir=str(work / "baseline_out"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=1, learning_rate=2e-5, warmup_steps=0.03,
        lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=args.precision == "bf16", logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=args.workers, remove_unused_columns=False,
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=args.device == "cpu", seed=0,
        disable_tqdm=True)
    CountingTrainer(model=model, args=targs, train_dataset=LazyDataset(), data_collator=collate,
                    callbacks=[Timer()]).train()
    return steady(rows, args.warmup_steps)


# ----------------------------------------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--samples", type=int, default=None, help="data set size (default: 192 tiny, 2048 otherwise)")
    p.add_argument("--batch-size", type=int, default=8, help="baseline: samples per micro-batch")
    p.add_argument("--pack-length", type=int, default=None, help="vistune: tokens per packed row (default: max_len)")
    p.add_argument("--rows", type=int, default=None,
                   help="vistune: packed rows per micro-batch (default: about the baseline's tokens per micro-batch)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--llm-mode", choices=["full", "lora"], default="full")
    p.add_argument("--attn", default="sdpa", help="attn_implementation for both (sdpa, flash_attention_2, eager)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="vistune's chunked cross-entropy")
    p.add_argument("--compile", action="store_true", help="vistune: torch.compile the LLM")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps left out of the rates of every system (default: 1; 3 with --compile)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each run")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    p.add_argument("--repeats", type=int, default=1, help="runs per system, alternating; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep parts and runs here (default: a temp folder)")
    p.add_argument("--output", type=Path, default=None,
                   help="default: benchmarks/results/train_throughput-<device>-<shape>.json")
    p.add_argument("--only", choices=["parts", *SYSTEMS], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.samples = args.samples or (192 if args.shape == "tiny" else 2048)
    args.pack_length = args.pack_length or SHAPES[args.shape]["max_len"]
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if args.compile else 1)
    args.systems = args.systems.split(",")
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or "baseline" not in args.systems:
        p.error(f"--systems: {', '.join(unknown) or 'baseline missing'}; valid: {', '.join(SYSTEMS)} (baseline needed)")
    return args


def child(args: argparse.Namespace) -> int:
    """One system in this process; prints its result as one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir
    if args.only == "parts":
        (work / "parts.json").write_text(json.dumps(build_parts(work / "parts", args.shape, args.device)))
        return 0
    parts = json.loads((work / "parts.json").read_text())
    data = work / "data" / "train.json"
    run = run_baseline if args.only == "baseline" else run_vistune
    result = run(args, parts, data, work)
    result["peak_memory_mib"] = peak_memory_mib(args.device)
    result["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else None
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _subprocess(args: argparse.Namespace, argv: list[str] | None, only: str, extra: list[str]) -> str:
    """Run this script with `--only ONLY` in a child process; its stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
           "--only", only, "--workdir", str(args.workdir), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        sys.exit(f"{only} run failed (exit {proc.returncode})")
    return proc.stdout


def run_systems(args: argparse.Namespace, argv: list[str] | None) -> dict[str, list[dict]]:
    """Every system `--repeats` times, alternating, so that a slow spell of a shared machine hits them all."""
    runs: dict[str, list[dict]] = {name: [] for name in args.systems}
    for _ in range(args.repeats):
        for system in runs:
            t = time.perf_counter()
            out = _subprocess(args, argv, system, ["--rows", str(args.rows)])
            line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{system} run printed no result:\n{out[-3000:]}")
            runs[system].append({**json.loads(line.removeprefix("RESULT ")), "wall_s": time.perf_counter() - t})
            print(f"  {system}: {runs[system][-1]['samples_per_s']:.2f} samples/s", flush=True)
    return runs


def summarise(args: argparse.Namespace, runs: dict[str, list[dict]], flops: float) -> tuple[dict, dict, float | None]:
    """Each system's fastest run (the least disturbed one) with its MFU, and each vistune system's ratios."""
    results = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in runs.items()}
    gpu = results["baseline"].get("gpu")
    peak = args.peak_tflops or (peak_tflops(gpu) if gpu else None)
    for r in results.values():
        r["model_tflops_per_s"] = flops * r["samples_per_s"] / 1e12
        r["mfu"] = r["model_tflops_per_s"] / peak if peak else None
    base = results["baseline"]
    ratios = {name: {"samples_per_s": r["samples_per_s"] / base["samples_per_s"],
                     "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                     "peak_memory": r["peak_memory_mib"] / base["peak_memory_mib"]}
              for name, r in results.items() if name != "baseline"}
    return results, ratios, peak


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.only:
        return child(args)
    import torch
    from train_tiny import environment

    # No CUDA call here beyond this check (it creates no context): the parent holds no GPU memory while
    # the children run.
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vistune-train-throughput-")
        args.workdir = Path(tmp.name)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "parts.json").is_file():
        _subprocess(args, argv, "parts", [])
    parts = json.loads((work / "parts.json").read_text())
    data = build_data(work / "data", args.shape, args.samples, args.seed)
    lengths = sample_lengths(parts, data, SHAPES[args.shape]["max_len"])
    mean_len = sum(t for t, _ in lengths) / len(lengths)
    if args.rows is None:  # about the baseline's real tokens per micro-batch, in packed rows
        args.rows = max(1, round(args.batch_size * mean_len / args.pack_length))
    print(f"{len(lengths)} samples, {sum(1 for _, i in lengths if i)} with an image, mean {mean_len:.0f} tokens "
          f"(min {min(t for t, _ in lengths)}, max {max(t for t, _ in lengths)}); parts and data in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    runs = run_systems(args, argv)
    flops = flops_per_sample(parts, lengths, args.llm_mode)
    results, ratios, peak = summarise(args, runs, flops)

    print(f"\n{'':16}{'samples/s':>12}{'tokens/s':>12}{'peak MiB':>11}{'MFU':>8}{'loss first→last':>20}")
    for name, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{name:16}{r['samples_per_s']:12.2f}{r['tokens_per_s']:12.0f}{r['peak_memory_mib']:11.0f}{mfu:>8}"
              f"{r['loss_first']:>10.3f}→{r['loss_last']:.3f}")
    for name, ratio in ratios.items():
        print(f"{name} / baseline: {ratio['samples_per_s']:.2f}x samples/s, {ratio['tokens_per_s']:.2f}x tokens/s, "
              f"{ratio['peak_memory']:.2f}x peak memory")

    machine, versions = environment()
    machine["gpu"] = results["baseline"].get("gpu")
    record = {
        "benchmark": "train_throughput", "device": args.device, "shape": args.shape,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("only", "workdir", "output")},
        "data": {"samples": len(lengths), "with_image": sum(1 for _, i in lengths if i), "mean_tokens": mean_len,
                 "image_tokens": _num_image_tokens(parts), "max_tokens": max(t for t, _ in lengths)},
        "model_flops_per_sample": flops, "peak_tflops": peak, "mfu_formula": MFU_FORMULA,
        "results": results, "all_runs": runs, "ratios_over_baseline": ratios,
        "machine": machine, "versions": versions,
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    out = args.output or REPO / "benchmarks" / "results" / f"train_throughput-{args.device}-{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
