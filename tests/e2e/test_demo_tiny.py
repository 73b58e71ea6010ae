"""The whole demo pipeline at its tiny size through `vistune demo`, then `vistune eval demo` and the demo's
benchmark scripts on what it wrote."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vistune.demo.world import MULTI_IMAGE_TYPES, QUESTION_TYPES


@pytest.mark.slow
def test_tiny_demo_runs_every_step(tmp_path: Path) -> None:
    from vistune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy_with_image", "accuracy_blind", "per_type", "wall_seconds", "machine", "peak_memory_gib"):
        assert key in report
    assert set(report["per_type"]) == set(QUESTION_TYPES) | set(MULTI_IMAGE_TYPES)
    assert 0 <= report["accuracy_with_image"] <= 1
    assert set(report["tiers"]) == {"readout", "binding"}
    assert set(report["tiers"]["readout"]) >= {"with_image", "blind"}
    assert set(report["descriptions"]) >= {"f1_with_image", "f1_blind", "precision_with_image", "recall_with_image"}
    assert (out / "examples.png").stat().st_size > 1000
    assert report["machine"]["torch"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| tier | with image | blind | questions |" in md and "loss_curves.png" in md
    # The model is an ordinary vistune checkpoint, and every data file went through datagen.
    assert (out / "finetune" / "vistune.json").is_file()
    for name in ("instruct.jsonl", "align.jsonl", "vqa.jsonl", "finetune.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    kinds = Counter(json.loads(line).get("kind") for line in (out / "data" / "instruct.jsonl").open())
    assert set(kinds) == {"conversation", "detail", "complex"}
    # Running it again finds every step done and gives the same numbers.
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["per_type"] == report["per_type"]
    # `vistune eval demo` on the same world and model gives the report's numbers.
    settings = report["settings"]
    assert main(["eval", "demo", "--model", str(out / "finetune"), "--data", str(out / "world"),
                 "--out", str(tmp_path / "eval"), "--batch-size", "32", "--device", "cpu",
                 "--option", f"demo.per_type={settings['eval_per_type']}", "--option", f"demo.seed={report['seed']}"]) == 0
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())["demo"]
    assert ev["accuracy_with_image"] == report["accuracy_with_image"]
    assert ev["accuracy_blind"] == report["accuracy_blind"]
    assert ev["per_type"] == report["per_type"]
    from benchmarks import demo_oracle as oracle
    from benchmarks import demo_probe as probe
    from benchmarks import demo_reading

    # benchmarks/demo_probe.py reads one token per object of the world's instances files.
    feats, shapes, colours = probe.object_features(out / "parts" / "clip", out / "world", "train", 1000, -2)
    objects = json.loads((out / "world" / "annotations" / "instances_train.json").read_text())["annotations"]
    assert feats.shape == (len(objects), 128) and len(shapes) == len(colours) == len(objects)
    assert 0.0 <= probe.probe(feats, shapes, feats, shapes) <= 1.0
    # benchmarks/demo_oracle.py trains the demo's LLM on ground-truth tokens of the same world.
    oracle.main(["--world", str(out / "world"), "--lm", str(out / "parts" / "lm"), "--task", "count", "--steps", "2",
                 "--batch-size", "4", "--eval-every", "1", "--eval-questions", "8", "--output", str(tmp_path / "oracle.json")])
    curve = json.loads((tmp_path / "oracle.json").read_text())["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and all(0.0 <= c["accuracy"] <= 1.0 for c in curve)
    oracle.main(["--world", str(out / "world"), "--lm", str(out / "parts" / "lm"), "--task", "existence", "--steps", "1",
                 "--batch-size", "4", "--eval-questions", "8", "--image-after-question",
                 "--output", str(tmp_path / "oracle_after.json")])
    assert len(json.loads((tmp_path / "oracle_after.json").read_text())["curve"]) == 2
    # benchmarks/demo_reading.py trains a fresh LLM on text descriptions, with the demo's tokenizer.
    demo_reading.main(["--tokenizer", str(out / "parts" / "tokenizer"), "--steps", "2", "--batch-size", "4",
                       "--hidden", "32", "--layers", "1", "--eval-every", "1",
                       "--output", str(tmp_path / "reading.json"), "--save", str(tmp_path / "reader")])
    reading = json.loads((tmp_path / "reading.json").read_text())["curve"]
    assert [c["step"] for c in reading] == [1, 2]
    assert set(reading[0]["per_type"]) <= set(QUESTION_TYPES) and 0.0 <= reading[-1]["accuracy"] <= 1.0
    assert (tmp_path / "reader" / "config.json").is_file() and (tmp_path / "reader" / "tokenizer.json").is_file()
