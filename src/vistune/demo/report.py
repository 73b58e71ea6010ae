"""The demo's report: report.json (numbers), report.md (tier table, curves, examples), loss_curves.png
and examples.png (a grid of test images, each with its description and a few answers, with the image
and blind)."""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from vistune.demo.evaluate import Question
from vistune.files import replacing, write_text

GRID = 8  # test images in examples.png and report.md


def _loss_rows(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r]


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> None:
    with replacing(out) as tmp:  # keeps the .png suffix, which savefig reads the format from
        fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)


def plot_losses(curves: dict[str, list[tuple[int, float]]], out: Path) -> None:
    """One panel per curve."""
    plt = _pyplot()
    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        ax.plot([s for s, _ in rows], [v for _, v in rows], linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def examples(results: dict, n: int = GRID) -> list[dict]:
    """Up to `n` described test images, those with the most evaluated one-image questions first: each
    with its descriptions and its questions' answers, with the image and blind."""
    asked: dict[str, list[tuple[Question, str, str]]] = defaultdict(list)
    for q, a, b in zip(results["questions"], *results["predictions"], strict=True):
        if len(q.all_images) == 1:
            asked[q.image.name].append((q, a, b))
    described = sorted(results["described"], key=lambda d: -len(asked[d[0].name]))[:n]
    return [{"image": path, "description": d, "description_blind": b, "truth": sorted(results["truth"][path.name]),
             "qa": asked[path.name][:3]} for path, d, b in described]


def plot_examples(rows: list[dict], out: Path) -> None:
    """The grid: each test image over a panel of its description and answers (long text cut short)."""
    plt = _pyplot()
    cols, nrows = 4, max(1, -(-len(rows) // 4))
    fig, axes = plt.subplots(2 * nrows, cols, figsize=(4.2 * cols, 6.6 * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [1.0, 0.6] * nrows})
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(rows):
        image_ax, text_ax = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        with Image.open(row["image"]) as im:
            image_ax.imshow(im.convert("RGB"), interpolation="nearest")
        lines = [f"truth: {', '.join(row['truth'])}", f"described: {_cut(row['description'], 140)}",
                 f"blind: {_cut(row['description_blind'], 90)}"]
        lines += [f"Q: {q.question} [{q.answer}] image: {_cut(a, 12)} / blind: {_cut(b, 12)}" for q, a, b in row["qa"]]
        text = "\n".join(textwrap.fill(line, 48) for line in lines)
        text_ax.text(0, 1, text, transform=text_ax.transAxes, va="top", ha="left", fontsize=8, family="monospace")
    fig.tight_layout()
    _save(fig, out)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _write(path: Path, text: str) -> None:
    write_text(path, text)


def _curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    parts = out / "parts"
    curves = {"CLIP (contrastive)": [(i + 1, v) for i, v in enumerate(
        json.loads((parts / "clip" / "stats.json").read_text())["losses"])],
        "stage 1: align": _loss_rows(out / "align" / "metrics.jsonl"),
        "stage 2: finetune": _loss_rows(out / "finetune" / "metrics.jsonl")}
    if (parts / "lm" / "stats.json").is_file():
        curves = {"LLM pretraining": [(i + 1, v) for i, v in enumerate(
            json.loads((parts / "lm" / "stats.json").read_text())["losses"])], **curves}
    return curves


def write_report(out: Path, *, facts: dict, results: dict, timings: dict[str, float], wall_seconds: float,
                 peak_memory_gib: float, machine: dict) -> dict[str, Any]:
    """Write report.json, report.md and the two PNGs; returns the report's numbers."""
    curves = _curves(out)
    plot_losses(curves, out / "loss_curves.png")
    scores = results["scores"]
    align = [v for _, v in curves["stage 1: align"]]
    report = {
        **scores,
        "gain_from_image": scores["accuracy_with_image"] - scores["accuracy_blind"],
        "descriptions": results["descriptions"],
        "n_questions": len(results["questions"]),
        "stage1_loss": _loss_summary(align),
        "wall_seconds": round(wall_seconds, 1),
        "step_seconds": {k: round(v, 1) for k, v in timings.items()},
        "peak_memory_gib": round(peak_memory_gib, 3),
        "model": str(results["model"]),
        "machine": machine,
        **facts,
    }
    _write(out / "report.json", json.dumps(report, indent=2, default=str))
    rows = examples(results)
    plot_examples(rows, out / "examples.png")
    _write(out / "report.md", "\n".join(_markdown(report, rows, results)))
    return report


def _loss_summary(losses: list[float]) -> dict:
    """Stage 1's loss at its start, after a tenth of its steps, the mean of its last tenth, and the mean
    of each tenth in order (whether it keeps falling is read from those, not from one noisy step)."""
    if not losses:
        return {}
    tenth = max(1, len(losses) // 10)
    means = [sum(losses[k:k + tenth]) / len(losses[k:k + tenth]) for k in range(0, tenth * 10, tenth)
             if losses[k:k + tenth]]
    return {"first": losses[0], "at_one_tenth": losses[tenth - 1], "last_tenth_mean": sum(losses[-tenth:]) / tenth,
            "tenth_means": means}


def _markdown(report: dict, rows: list[dict], results: dict) -> list[str]:
    d, m = report["descriptions"], report["machine"]
    return [
        "# vistune demo report",
        "",
        f"The whole LLaVA pipeline in miniature: {report['world']['train']['images']} training scenes, "
        f"LLM `{report['llm']}`, size `{report['size']}`, seed {report['seed']}. "
        f"Wall time {report['wall_seconds'] / 60:.1f} min, peak memory {report['peak_memory_gib']:.2f} GiB "
        f"({m['cpu_count']} CPUs, torch {m['torch']}, transformers {m['transformers']}).",
        "",
        "## Held-out questions, by tier",
        "",
        "Each question is asked with its image and again with a blank image (blind). **Readout** questions ask "
        "for an attribute of the scene itself; **binding** questions name one object and ask about another "
        "attribute of it, which a minutes-old LLM does not learn (see the README).",
        "",
        "| tier | with image | blind | questions |",
        "|---|---|---|---|",
        *[f"| {t} | **{r['with_image']:.3f}** | {r['blind']:.3f} | {r['n']} |" for t, r in report["tiers"].items()],
        "",
        "| type | with image | blind | majority answer | questions |",
        "|---|---|---|---|---|",
        *[f"| {t} | {r['with_image']:.3f} | {r['blind']:.3f} | {r['majority']:.2f} | {r['n']} |"
          for t, r in report["per_type"].items()],
        "",
        "The majority answer is what one fixed answer would score (each type is balanced over its answers).",
        "",
        *_reading_check(report),
        "## Descriptions (\"Describe the image briefly.\")",
        "",
        f"{d['n']} test images, with the image and blind; objects named (colour + shape) against the scene's true "
        "objects, pooled over images:",
        "",
        "| | precision | recall | F1 |",
        "|---|---|---|---|",
        f"| with image | {d['precision_with_image']:.3f} | {d['recall_with_image']:.3f} | **{d['f1_with_image']:.3f}** |",
        f"| blind | {d['precision_blind']:.3f} | {d['recall_blind']:.3f} | {d['f1_blind']:.3f} |",
        "",
        f"Text quality (with the image): {d['with_repeated_3gram']} of {d['n']} descriptions repeat a word 3-gram; "
        f"{d['non_word_count']} of {d['words']} words are not in the world's text"
        + (f" ({', '.join(d['non_words'][:10])})." if d["non_words"] else "."),
        "",
        "## Examples (test images, never trained on)",
        "",
        "![examples](examples.png)",
        "",
        *[line for row in rows for line in _example_md(row)],
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
        _stage1_note(report["stage1_loss"]),
        "",
        "## Time per step (seconds)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in report["step_seconds"].items()],
        "",
    ]


def _example_md(row: dict) -> list[str]:
    lines = [f"**{row['image'].name}** (truth: {', '.join(row['truth'])})", "",
             f"- described: {row['description'] or '(empty)'}", f"- blind: {row['description_blind'] or '(empty)'}"]
    lines += [f"- {q.question} (answer {q.answer}): with image *{a}*, blind *{b}*" for q, a, b in row["qa"]]
    return [*lines, ""]


def _stage1_note(s: dict[str, float]) -> str:
    if not s:
        return ""
    means = s.get("tenth_means", [])
    trend = ""
    if len(means) >= 3:
        falling = sum(b < a for a, b in zip(means[1:], means[2:]))
        trend = (f" Means over each tenth: {', '.join(f'{m:.2f}' for m in means)}; after the first tenth it falls "
                 f"in {falling} of the {len(means) - 2} tenths that follow.")
    return (f"Stage 1 (projector only): loss {s['first']:.2f} at the first step, {s['at_one_tenth']:.2f} after a "
            f"tenth of its steps, {s['last_tenth_mean']:.2f} over its last tenth.{trend}")


def _reading_check(report: dict) -> list[str]:
    """The stand-in LLM's own ceiling, when it was measured: its answers from the captions as text."""
    check = report.get("lm", {}).get("answers_from_captions")
    if not check:
        return []
    per = ", ".join(f"{t} {r['accuracy']:.2f}" for t, r in check["per_type"].items())
    return [f"Reading check: the stand-in LLM alone, given each test image's captions as text instead of the "
            f"image, answers {check['accuracy']:.3f} of the same questions ({per}).", ""]
