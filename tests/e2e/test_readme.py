"""The README's commands run as written, every option the docs give a `vistune` command exists, and
every relative link in README.md, docs/*.md and benchmarks/README.md resolves.

Each command in the README's ```bash blocks, and each ```python block, is one test. It runs in a
scratch folder laid out as the README assumes, with the test suite's tiny parts standing in for the
real ones (`_scratch`):

    runs/llava-1.5-7b/finetune                    the tiny checkpoint (conftest's `tiny_checkpoint`)
    photo.jpg                                     a test image
    checkpoints/clip-vit-large-patch14-336        the tiny CLIP
    checkpoints/vicuna-7b-v1.5                    the tiny Llama
    data/...                                      the tiny LLaVA-format data, at the paths run.yaml names
    run.yaml                                      the README's ```yaml block that starts `# run.yaml`

A command is skipped by one of `SKIP_RULES` when it cannot run offline in seconds (it installs, needs
real weights or a GPU, or serves until stopped); the rule's reason is the skip message. `vistune train`
trains at the size its config names (real checkpoints, GPUs), so it runs here with `--dry-run` added:
the config, its overrides and every stage are checked, nothing is trained. A command that
no rule skips must be a `vistune` command with an entry in `EXPECTED_OUTPUT`, or the test fails: a new
kind of README command needs a rule here. Commands run in this process (`vistune.cli.main`), so the
whole file takes seconds.

Skipped or not, every `--flag` that a `vistune` command in README.md or docs/*.md uses (fenced bash
blocks and inline code) must appear in that command's `--help`, so a renamed option fails here too.
The README's demo table must give the numbers of the recorded run, `benchmarks/results/demo-standin.json`.
"""

from __future__ import annotations

import io
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from vistune.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, *DOCS, ROOT / "benchmarks" / "README.md"]

# (pattern matched against the command line, why it is not run here). The first match wins.
SKIP_RULES: list[tuple[str, str]] = [
    (r"^make\b", ("make installs into this environment and `make test` is this suite (CI runs it); "
                  "`make demo` takes about ten minutes on 2 cores")),
    (r"^vistune demo\b", ("the demo takes a minute even at --size tiny; "
                          "tests/e2e/test_demo_tiny.py::test_tiny_demo_runs_every_step runs it")),
    (r"^vistune (serve|ui)\b", "a server runs until stopped; tests/e2e/test_serve*.py start it"),
]

# What each command that runs must print (stdout), beyond exiting with 0.
EXPECTED_OUTPUT: dict[str, str] = {
    "ask": r"\S",
    "chat": r"(?s)assistant> .*assistant> ",
    "info": r"conversation_format",
    "train": r"dry run: every stage checked",
    "data": "⟦",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: Path, lang: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(path.read_text()) if tag == lang]


def _commands(block: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def _readme_commands() -> list[str]:
    return [cmd for block in _blocks(README, "bash") for cmd in _commands(block)]


def _skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIP_RULES if re.search(pattern, command)), None)


def _readme_params() -> list[object]:
    """One pytest param per README command, the skipped ones marked at collection (no fixtures built)."""
    return [pytest.param(cmd, marks=pytest.mark.skip(reason=why)) if (why := _skip_reason(cmd)) else cmd
            for cmd in _readme_commands()]


@pytest.fixture(scope="module")
def _scratch(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, clip_dir: Path,
             llama_dir: Path, dataset_dir: Path) -> Path:
    """A folder laid out as the README's commands expect (module docstring), the tiny parts linked in."""
    root = tmp_path_factory.mktemp("readme")
    links = {
        "runs/llava-1.5-7b/finetune": tiny_checkpoint,
        "photo.jpg": dataset_dir / "images" / "img_0.png",
        "checkpoints/clip-vit-large-patch14-336": clip_dir,
        "checkpoints/vicuna-7b-v1.5": llama_dir,
        "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json": dataset_dir / "align.json",
        "data/LLaVA-Pretrain/images": dataset_dir / "images",
        "data/llava_v1_5_mix665k.json": dataset_dir / "train.json",
        "configs": ROOT / "configs",
    }
    # The stage-2 mix names its images relative to `data/` (image_folder: data).
    links.update({f"data/{image.name}": image for image in (dataset_dir / "images").iterdir()})
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target)
    for block in _blocks(README, "yaml"):
        first = block.splitlines()[0]
        named = re.match(r"#\s*([\w.-]+\.yaml)\b", first)
        if named:
            (root / named.group(1)).write_text(block)
    return root


def _stdin_for(argv: list[str]) -> str:
    """`vistune chat` reads turns from stdin: two questions with /reset between, then an empty line."""
    return "Describe the image.\n/reset\nWhat colour is it?\n\n" if argv[0] == "chat" else ""


@pytest.mark.parametrize("command", _readme_params())
def test_readme_command_runs(command: str, _scratch: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    words = shlex.split(command)
    argv = words[1:]
    if argv[:1] == ["train"] and "--dry-run" not in argv:
        argv.append("--dry-run")  # training needs the real parts; the check of every stage runs as written
    assert words[0] == "vistune" and argv[0] in EXPECTED_OUTPUT, \
        f"no rule runs or skips {command!r}: add one to SKIP_RULES or EXPECTED_OUTPUT"

    monkeypatch.chdir(_scratch)
    monkeypatch.setattr(sys, "stdin", io.StringIO(_stdin_for(argv)))
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(EXPECTED_OUTPUT[argv[0]], out), f"{command!r} printed:\n{out}"


@pytest.mark.parametrize("index", range(len(_blocks(README, "python"))))
def test_readme_python_runs(index: int, _scratch: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    script = _scratch / f"readme_python_{index}.py"
    script.write_text(_blocks(README, "python")[index])
    monkeypatch.chdir(_scratch)
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_readme_has_runnable_commands() -> None:
    """The rules above must leave something to run: ask, chat, info, and a dry run at least."""
    ran = {shlex.split(cmd)[1] for cmd in _readme_commands() if _skip_reason(cmd) is None}
    assert {"ask", "chat", "info", "train"} <= ran


def _vistune_commands(path: Path) -> list[list[str]]:
    """argv after `vistune` (or `-m vistune.cli`) of each command in a file's bash blocks and inline code."""
    text = path.read_text()
    lines = [cmd for block in _blocks(path, "bash") for cmd in _commands(block)]
    prose = _FENCE.sub("", text)
    lines += [" ".join(span.split()) for span in re.findall(r"`(vistune [^`]+)`", prose)]
    found = []
    for line in lines:
        words = line.replace("[", " ").replace("]", " ").split()
        for i, word in enumerate(words):
            if word == "vistune" and i == 0 or word == "vistune.cli" and i > 0 and words[i - 1] == "-m":
                found.append(words[i + 1:])
                break
    return found


def _command_path(argv: list[str]) -> tuple[str, ...]:
    """The (sub)command an argv names: `train`, or `data show` / `datagen instruct` for the nested ones."""
    if not argv or argv[0].startswith("-"):
        return ()
    if argv[0] in ("data", "datagen") and len(argv) > 1 and not argv[1].startswith("-"):
        return tuple(argv[:2])
    return (argv[0],)


def _flags_by_command() -> dict[tuple[str, ...], set[tuple[str, str]]]:
    used: dict[tuple[str, ...], set[tuple[str, str]]] = {}
    for path in [README, *DOCS]:
        for argv in _vistune_commands(path):
            flags = {(w.split("=")[0], path.name) for w in argv if w.startswith("--")}
            used.setdefault(_command_path(argv), set()).update(flags)
    return used


@pytest.mark.parametrize("command", sorted(_flags_by_command()), ids=lambda c: " ".join(c) or "vistune")
def test_documented_options_exist(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0, f"vistune {' '.join(command)} is not a command"
    help_text = capsys.readouterr().out
    missing = sorted(f"{flag} (in {where})" for flag, where in _flags_by_command()[command]
                     if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text))
    assert not missing, f"vistune {' '.join(command)} --help does not list: {', '.join(missing)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose = _FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.MULTILINE)}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    prose = _FENCE.sub("", path.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: {', '.join(broken)}"


def test_readme_demo_table_is_the_recorded_run() -> None:
    """The README's demo table gives the numbers of `benchmarks/results/demo-standin.json`, so a new
    recorded run without its README update (or the reverse) fails here instead of going stale."""
    report = json.loads((ROOT / "benchmarks" / "results" / "demo-standin.json").read_text())
    tiers, desc = report["tiers"], report["descriptions"]
    expected = {
        "readout": (tiers["readout"]["with_image"], tiers["readout"]["blind"]),
        "binding": (tiers["binding"]["with_image"], tiers["binding"]["blind"]),
        "description object F1": (desc["f1_with_image"], desc["f1_blind"]),
    }
    rows = dict(re.findall(r"^\| (readout|binding|description object F1) \| (.+) \|$", README.read_text(),
                           re.MULTILINE))
    assert rows.keys() == expected.keys(), f"README's demo table has rows {sorted(rows)}"
    for name, (with_image, blind) in expected.items():
        shown = [float(x) for x in re.findall(r"\d\.\d{3}", rows[name])]
        assert shown == [round(with_image, 3), round(blind, 3)], \
            f"README's demo row {name!r} shows {shown}; demo-standin.json gives {with_image:.3f} / {blind:.3f}"
