"""A bounded load test through the real command: `vistune serve` in a subprocess, many concurrent
`openai` clients (the driver of benchmarks/serve_load.py); no 5xx, no lost or short replies, and the
server really batched."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import serve_load


def test_concurrent_load_through_the_cli_server(tiny_checkpoint: Path, dataset_dir: Path) -> None:
    args = argparse.Namespace(image=dataset_dir / "images" / "img_0.png", requests=32, concurrency=16,
                              max_tokens=8, device="cpu")
    run = serve_load.serve_and_load(tiny_checkpoint, 16, args)
    assert run["status_counts"] == {"200": 32}, run
    assert run["ok"] == 32 and run["lost"] == 0 and run["server_errors_5xx"] == 0
    assert run["server"]["completed"] == 32 and run["server"]["failed"] == 0 and run["server"]["running"] == 0
    assert run["server"]["largest_batch"] > 1  # requests were batched, not served one by one
    assert run["latency_p95_s"] >= run["latency_p50_s"] > 0


def test_worst_case_decode_measures_the_server(tiny_checkpoint: Path) -> None:
    """The memory benchmark's driver (issue 17 item 4), on small images: every request answered, and
    the server's resident memory read before, at the peak and after."""
    args = argparse.Namespace(device="cpu", decode_concurrency=3, decode_images=2, decode_side=256)
    run = serve_load.worst_case_decode(tiny_checkpoint, args)
    assert run["status_counts"] == {"200": 3}, run
    assert 0 < run["rss_mib_before"] <= run["rss_mib_peak"] and run["rss_mib_after"] <= run["rss_mib_peak"]
