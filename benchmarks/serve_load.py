"""Load test of `vistune serve`: many concurrent OpenAI clients against one server on loopback.

For each setting of --max-batch-size (default: 32, i.e. dynamic batching, and 1, i.e. one request
at a time), it starts `python -m vistune.cli serve` as a subprocess, sends N requests with at most C
in flight through the official `openai` async client, and records: HTTP outcomes (a 5xx or a lost
response fails the run), throughput (requests/s and generated tokens/s) and latency percentiles.
Requests mix text-only and data:-image prompts, plain and streamed, greedy and seeded sampling; every
reply has a fixed length (`ignore_eos`, so both settings do the same work).

    python benchmarks/serve_load.py                          # tiny model built here, 400 requests at 32
    python benchmarks/serve_load.py --model runs/x/finetune --requests 200 --concurrency 16

With --worst-case-decode it instead sends issue 17's worst case for image decoding (8 requests at
once, each with 4 one-colour 4096x4096 PNGs) and records the server's resident memory before, at the
peak and after; --src runs another checkout's code (e.g. the code before the decode budget):

    python benchmarks/serve_load.py --worst-case-decode --name decode

Results: benchmarks/results/serve_load-<name>.json (machine, versions, command, numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    ok: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)  # HTTP status (or "connection") -> count
    lost: int = 0  # no answer, an empty/short answer, or a broken stream
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
        return {"requests": self.requests, "concurrency": self.concurrency, "ok": self.ok,
                "status_counts": self.status_counts, "lost": self.lost,
                "server_errors_5xx": sum(v for k, v in self.status_counts.items() if k.startswith("5")),
                "wall_s": round(self.wall_s, 3), "requests_per_s": round(self.ok / self.wall_s, 3),
                "completion_tokens_per_s": round(self.completion_tokens / self.wall_s, 1),
                "latency_p50_s": round(q[49], 4), "latency_p95_s": round(q[94], 4), "latency_max_s": round(lat[-1], 4)}


async def run_load(base_url: str, model: str, image: Path, requests: int, concurrency: int, max_tokens: int,
                   api_key: str = "none") -> LoadResult:
    """Send `requests` chat completions, `concurrency` at a time; count outcomes and latencies."""
    import openai

    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)
    result = LoadResult(requests, concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        question = ["What colour is the shape?", "Where is the shape?", "Describe the image briefly."][i % 3]
        content: str | list = question
        if i % 2 == 0:
            content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
        kwargs = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                  "temperature": 0.0 if i % 4 < 2 else 0.8, "seed": i, "extra_body": {"ignore_eos": True}}
        async with gate:
            start = time.perf_counter()
            try:
                if i % 4 == 1:  # streamed
                    stream = await client.chat.completions.create(**kwargs, stream=True,
                                                                  stream_options={"include_usage": True})
                    usage, finish = None, None
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                        usage = chunk.usage or usage
                    n = usage.completion_tokens if usage and finish else 0
                else:
                    r = await client.chat.completions.create(**kwargs)
                    n = r.usage.completion_tokens if r.choices and r.choices[0].message.content is not None else 0
                status = "200"
            except openai.APIStatusError as e:
                status, n = str(e.status_code), 0
            except openai.APIError:
                status, n = "connection", 0
            result.latencies_s.append(time.perf_counter() - start)
        result.status_counts[status] = result.status_counts.get(status, 0) + 1
        if status == "200" and n == max_tokens:
            result.ok += 1
            result.completion_tokens += n
        else:
            result.lost += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    result.wall_s = time.perf_counter() - start
    await client.close()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, device: str, extra: list[str],
                   src: Path = ROOT / "src") -> Iterator[tuple[subprocess.Popen, str]]:
    """`vistune serve` (the code under `src`) in a subprocess on a free port: (process, base URL)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "vistune.cli", "serve", str(model), "--port", str(port), "--served-model-name",
           "bench", "--log-level", "warning", "--device", device, *extra]
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.3)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_and_load(model: Path, batch: int, args: argparse.Namespace) -> dict:
    import httpx

    with running_server(model, args.device, ["--max-batch-size", str(batch), "--max-tokens", str(args.max_tokens)]) \
            as (_, base):
        result = asyncio.run(run_load(base, "bench", args.image, args.requests, args.concurrency, args.max_tokens))
        stats = httpx.get(f"{base}/stats", timeout=5).json()
    return {"max_batch_size": batch, **result.summary(), "server": stats}


def _rss_mib(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak so far (VmHWM) of a process, in MiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


def worst_case_decode(model: Path, args: argparse.Namespace, src: Path = ROOT / "src") -> dict:
    """Issue 17's worst case for image decoding: `--decode-concurrency` requests sent at once, each with
    `--decode-images` one-colour PNGs of `--decode-side` squared pixels (a few dozen KB each, about
    50 MB each decoded). Records the server's resident memory before, at the peak, and after."""
    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (args.decode_side, args.decode_side), (90, 140, 200)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "bench", "max_tokens": 2, "messages": [{"role": "user", "content": [
        *[{"type": "image_url", "image_url": {"url": uri}}] * args.decode_images, {"type": "text", "text": "Colour?"}]}]}

    async def send_all(base: str) -> list[int]:
        async with httpx.AsyncClient(timeout=600) as client:
            answers = await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body)
                                             for _ in range(args.decode_concurrency)), return_exceptions=True)
        return [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]

    with running_server(model, args.device, ["--max-batch-size", "32"], src) as (proc, base):
        time.sleep(1.0)
        before = _rss_mib(proc.pid)
        start = time.perf_counter()
        codes = asyncio.run(send_all(base))
        wall = time.perf_counter() - start
        after = _rss_mib(proc.pid)
    return {"concurrency": args.decode_concurrency, "images_per_request": args.decode_images,
            "image_side": args.decode_side, "png_bytes": len(buf.getvalue()),
            "status_counts": {str(c): codes.count(c) for c in sorted(set(codes))}, "wall_s": round(wall, 2),
            "rss_mib_before": before["VmRSS"], "rss_mib_peak": after["VmHWM"], "rss_mib_after": after["VmRSS"]}


def build_tiny(root: Path) -> tuple[Path, Path]:
    """The test suite's tiny CLIP + Llama, finetuned a few steps; returns (checkpoint, an image)."""
    from vistune.config import load_config
    from vistune.testing import build_bpe_tokenizer, build_clip, build_dataset, build_llama
    from vistune.train.loop import train_stage

    tok, clip, ds = build_bpe_tokenizer(root / "tok"), build_clip(root / "clip"), build_dataset(root / "ds")
    llama = build_llama(root / "llama", tok)
    cfg = load_config(data={
        "model": {"vision": {"path": str(clip)}, "llm": {"path": str(llama)}, "projector": "mlp2x_gelu"},
        "stages": {"finetune": {"parts": {"projector": "full", "llm": "full"},
                                "data": {"path": str(ds / "train.json"), "image_folder": str(ds / "images")},
                                "format": "chat_template", "output_dir": str(root / "model"), "max_steps": 10,
                                "global_batch_size": 4, "micro_batch_size": 4, "lr": 3e-3, "precision": "fp32",
                                "tensorboard": False}}})
    train_stage(cfg.model, cfg.stages["finetune"], "finetune")
    return root / "model", ds / "images" / "img_0.png"


def environment() -> dict:
    import fastapi
    import openai
    import torch
    import transformers
    import uvicorn

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return {"machine": {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "fastapi": fastapi.__version__,
                         "uvicorn": uvicorn.__version__, "openai": openai.__version__},
            "git_revision": rev or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a vistune checkpoint (default: the tiny test model, built here)")
    p.add_argument("--image", type=Path, help="image for the image prompts (default: one of the tiny dataset's)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="reply length (fixed: ignore_eos)")
    p.add_argument("--batch-sizes", default="32,1", help="server --max-batch-size settings to compare")
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="tiny", help="results file: benchmarks/results/serve_load-NAME.json")
    p.add_argument("--output", type=Path)
    p.add_argument("--worst-case-decode", action="store_true", help="measure server memory under issue 17's "
                   "worst image-decoding load instead of throughput")
    p.add_argument("--decode-concurrency", type=int, default=8)
    p.add_argument("--decode-images", type=int, default=4, help="images per request (the default --max-images)")
    p.add_argument("--decode-side", type=int, default=4096, help="square images of this side (default 4096)")
    p.add_argument("--src", type=Path, action="append", default=None,
                   help="with --worst-case-decode: the src/ folder of the code to run (repeat to compare)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model, default_image = build_tiny(Path(tmp))
            args.image = args.image or default_image
        if args.worst_case_decode:
            return _report_decode(args, argv)
        if args.image is None:
            p.error("--image is needed with --model")
        runs = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            run = serve_and_load(args.model, batch, args)
            runs.append(run)
            print(f"max_batch_size {batch:>3}: {run['ok']}/{run['requests']} ok, 5xx {run['server_errors_5xx']}, "
                  f"lost {run['lost']}, {run['requests_per_s']} req/s, {run['completion_tokens_per_s']} tok/s, "
                  f"p50 {run['latency_p50_s']} s, p95 {run['latency_p95_s']} s", flush=True)
    report = {"benchmark": "serve_load", **environment(),
              "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                           "mix": "1/2 with a data: image, 1/4 streamed, 1/2 greedy and 1/2 seeded sampling at 0.8"},
              "runs": runs}
    if len(runs) >= 2 and runs[-1]["requests_per_s"]:
        report["speedup_throughput"] = round(runs[0]["requests_per_s"] / runs[-1]["requests_per_s"], 2)
    out = args.output or ROOT / "benchmarks" / "results" / f"serve_load-{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["server_errors_5xx"] == 0 and r["lost"] == 0 for r in runs) else 1


def _report_decode(args: argparse.Namespace, argv: list[str] | None) -> int:
    runs = []
    for src in args.src or [ROOT / "src"]:
        run = {"src": str(src), **worst_case_decode(args.model, args, src)}
        runs.append(run)
        print(f"{src}: {run['status_counts']}, RSS {run['rss_mib_before']} MiB before, {run['rss_mib_peak']} at the "
              f"peak, {run['rss_mib_after']} after, {run['wall_s']} s", flush=True)
    report = {"benchmark": "serve_load --worst-case-decode", **environment(),
              "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}
    out = args.output or ROOT / "benchmarks" / "results" / f"serve_load-{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(not any(k.startswith("5") and k != "503" for k in r["status_counts"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
