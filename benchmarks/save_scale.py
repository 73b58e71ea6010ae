"""Save time and peak host memory of a Vicuna-7B-shaped LLM's checkpoints, measured on CPU at a few layer counts
and extrapolated to 32 layers (the machine this was written on has 24 GiB shared by several jobs: a whole 7B
resume save, ~81 GB of weights and Adam moments, does not fit in it).

    python benchmarks/save_scale.py                       # layers 0, 1, 2; writes results/save_scale-cpu.json

What is saved, each in its own subprocess (so ru_maxrss is that save's):
- `final-fp32`: the LLM's `save_pretrained` from float32 master weights (what a bf16 full finetune wrote before);
- `final-bf16`: the same after casting to bf16 in place, as `train_stage` now does (the cast is timed too);
- `resume`: `vistune.train.state.save_resume` of the trained weights and AdamW state (float32, both moments),
  as every `save_every` steps of a full finetune (resume checkpoints keep float32: they continue training).
Weights are allocated empty (`to_empty`) and filled with a constant: what is measured is bytes moved.

Per mode and layer count: seconds for the save call, seconds until its files are on disk (fsync), bytes
written, the process's resident memory before the save and its peak (ru_maxrss). A 7B figure is the linear
fit through the measured layer counts (every decoder layer of Vicuna-7B has the same 202M parameters; the
embeddings and head are the fit's constant), labelled `extrapolated_32_layers`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
MODES = ("final-fp32", "final-bf16", "resume")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def measure(mode: str, layers: int, out: Path) -> dict:
    """One save in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vistune.train.state import Progress, gather_state, save_resume

    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B, num_hidden_layers=layers))
    llm.to_empty(device="cpu")
    with torch.no_grad():
        for t in llm.parameters():
            t.fill_(0.01)  # touched: uninitialised pages would not count as resident memory
    params = sum(p.numel() for p in llm.parameters())
    if mode == "resume":
        optimizer = torch.optim.AdamW(llm.parameters(), lr=1e-5)
        for p in llm.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # creates both moments
        optimizer.zero_grad(set_to_none=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    if mode == "resume":
        folder = save_resume(out, gather_state(llm, optimizer), scheduler, Progress(step=1), keep=1)
    else:
        if mode == "final-bf16":
            llm.to(torch.bfloat16)
        folder = out / "llm"
        llm.save_pretrained(str(folder))
    t_call = time.perf_counter() - t0
    _fsync_tree(folder)
    t_disk = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "layers": layers, "parameters": params, "save_s": t_call, "save_and_fsync_s": t_disk,
            "bytes_written": written, "rss_before_mib": rss_before, "peak_rss_mib": peak,
            "peak_over_before_mib": peak - rss_before}


def fit(rows: list[dict], key: str, layers: int = 32) -> float:
    """Least-squares line through (layers, key), read at `layers`."""
    xs = [r["layers"] for r in rows]
    ys = [r[key] for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + slope * (layers - mx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="0,1,2", help="layer counts measured (at least two)")
    p.add_argument("--resume-layers", default="0,1", help="layer counts for `resume` (4x the float32 bytes)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vistune-save-scale"))
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "save_scale-cpu.json")
    p.add_argument("--one", nargs=2, metavar=("MODE", "LAYERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        import shutil

        out = args.workdir / f"{args.one[0]}-{args.one[1]}"
        shutil.rmtree(out, ignore_errors=True)
        print("RESULT " + json.dumps(measure(args.one[0], int(args.one[1]), out)), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return 0

    from train_tiny import environment

    rows: list[dict] = []
    for mode in MODES:
        for layers in (args.resume_layers if mode == "resume" else args.layers).split(","):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--one", mode, layers],
                                  env=env, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{mode} at {layers} layers failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line.removeprefix("RESULT ")))
            r = rows[-1]
            print(f"{mode:11} {layers:>2} layers {r['parameters'] / 1e9:5.2f}B params: save {r['save_s']:6.1f} s, "
                  f"+fsync {r['save_and_fsync_s']:6.1f} s, {r['bytes_written'] / 2**30:5.2f} GiB written, "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB ({r['peak_over_before_mib']:+.0f} over before)", flush=True)
    extrapolated = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        extrapolated[mode] = {k: fit(mine, k) for k in ("parameters", "save_s", "save_and_fsync_s", "bytes_written",
                                                       "peak_rss_mib", "peak_over_before_mib")}
        e = extrapolated[mode]
        print(f"{mode:11} 32 layers (extrapolated) {e['parameters'] / 1e9:.2f}B: save {e['save_s']:.0f} s, +fsync "
              f"{e['save_and_fsync_s']:.0f} s, {e['bytes_written'] / 2**30:.1f} GiB, peak RSS {e['peak_rss_mib'] / 1024:.1f} GiB")
    machine, versions = environment()
    record = {"benchmark": "save_scale", "shape": "Vicuna-7B layers (LlamaForCausalLM)", "measured": rows,
              "extrapolated_32_layers": extrapolated, "machine": machine, "versions": versions,
              "command": shlex.join([sys.executable, *sys.argv])}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
