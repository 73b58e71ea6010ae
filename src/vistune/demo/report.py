"""The demo's report: report.json (numbers), report.md (table, curves, samples), loss_curves.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from vistune.demo.evaluate import Question


def _loss_rows(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r]


def plot_losses(curves: dict[str, list[tuple[int, float]]], out: Path) -> None:
    """One panel per curve; matplotlib without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        ax.plot([s for s, _ in rows], [v for _, v in rows], linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, *, facts: dict, scores: dict, questions: list[Question],
                 predictions: tuple[list[str], list[str]], samples: list[tuple[Path, str]],
                 conversation: tuple[Path, str], timings: dict[str, float], wall_seconds: float,
                 peak_memory_gib: float, model_dir: Path, machine: dict) -> dict[str, Any]:
    parts = out / "parts"
    curves = {
        "CLIP (contrastive)": [(i + 1, v) for i, v in enumerate(
            json.loads((parts / "clip" / "stats.json").read_text())["losses"])],
        "stage 1: align": _loss_rows(out / "align" / "metrics.jsonl"),
        "stage 2: finetune": _loss_rows(out / "finetune" / "metrics.jsonl"),
    }
    if (parts / "lm" / "stats.json").is_file():
        curves = {"LLM pretraining": [(i + 1, v) for i, v in enumerate(
            json.loads((parts / "lm" / "stats.json").read_text())["losses"])], **curves}
    plot_losses(curves, out / "loss_curves.png")

    with_image, blind = scores["with_image"], scores["blind"]
    per_type = {t: {"with_image": row["accuracy"], "blind": blind["per_type"][t]["accuracy"], "n": row["n"]}
                for t, row in with_image["per_type"].items()}
    report = {
        "accuracy_with_image": with_image["accuracy"],
        "accuracy_blind": blind["accuracy"],
        "gain_from_image": with_image["accuracy"] - blind["accuracy"],
        "per_type": per_type,
        "n_questions": len(questions),
        "wall_seconds": round(wall_seconds, 1),
        "step_seconds": {k: round(v, 1) for k, v in timings.items()},
        "peak_memory_gib": round(peak_memory_gib, 3),
        "model": str(model_dir),
        "machine": machine,
        **facts,
    }
    _write(out / "report.json", json.dumps(report, indent=2))

    shown = out / "report_images"
    shown.mkdir(exist_ok=True)
    for p, _ in samples:
        # The scenes are 64 px; shown 4x larger (nearest neighbour, no smoothing) so they can be seen.
        with Image.open(p) as im:
            im.resize((im.width * 4, im.height * 4), Image.NEAREST).save(shown / p.name)
    md = [
        "# vistune demo report",
        "",
        f"The whole LLaVA pipeline in miniature: {facts['world']['train']['images']} training scenes, "
        f"LLM `{facts['llm']}`, size `{facts['size']}`, seed {facts['seed']}. "
        f"Wall time {wall_seconds / 60:.1f} min, peak memory {peak_memory_gib:.2f} GiB "
        f"({machine['cpu_count']} CPUs, torch {machine['torch']}, transformers {machine['transformers']}).",
        "",
        "## Held-out questions",
        "",
        "Each question is asked with its image and again with the image replaced by a blank one (blind).",
        "",
        "| type | with image | blind | questions |",
        "|---|---|---|---|",
        *[f"| {t} | {r['with_image']:.3f} | {r['blind']:.3f} | {r['n']} |" for t, r in per_type.items()],
        f"| **all** | **{report['accuracy_with_image']:.3f}** | **{report['accuracy_blind']:.3f}** | "
        f"{len(questions)} |",
        "",
        *_reading_check(facts),
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Sample descriptions (test images, never trained on)",
        "",
        *[f"![{p.name}](report_images/{p.name})\n\n> {d or '(empty)'}\n" for p, d in samples],
        "## A conversation",
        "",
        f"**User** (image `{conversation[0].name}`): What do you see in this image?",
        "",
        f"**Assistant**: {conversation[1] or '(empty)'}",
        "",
        "## Some answers",
        "",
        "| type | question | answer | with image | blind |",
        "|---|---|---|---|---|",
        *[f"| {q.type} | {q.question} | {q.answer} | {a} | {b} |"
          for q, a, b in list(zip(questions, *predictions))[:: max(1, len(questions) // 15)]],
        "",
        "## Time per step (seconds)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        "",
    ]
    _write(out / "report.md", "\n".join(md))
    return report


def _reading_check(facts: dict) -> list[str]:
    """The stand-in LLM's own ceiling, when it was measured: its answers from the captions as text."""
    check = facts.get("lm", {}).get("answers_from_captions")
    if not check:
        return []
    per = ", ".join(f"{t} {r['accuracy']:.2f}" for t, r in check["per_type"].items())
    return [f"Reading check: the stand-in LLM alone, given each test image's captions as text instead of the "
            f"image, answers {check['accuracy']:.3f} of the same questions ({per}). A VLM built on it is not "
            "expected to read more from pixels than its LLM reads from a description.", ""]
