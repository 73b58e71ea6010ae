"""The `vistune` command: each subcommand is one typed function; tyro builds its flags and --help from the
signature (defaults) and the docstring (`Args:`), and the option groups of `vistune.cli_options`.

Heavy imports (torch, transformers) happen inside the commands, so `vistune --help` is instant.
Errors a user can fix (VistuneError) print as one line, without a traceback, and exit with 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import tyro
from tyro.conf import FlagCreatePairsOff, OmitArgPrefixes, Positional, Suppress, UseAppendAction, arg, subcommand

from vistune.cli_options import Device, Dtype, Generation, ModelPath, Parts
from vistune.datagen import cli as datagen_cli
from vistune.errors import VistuneError
from vistune.eval.cli import eval_tasks
from vistune.serve.cli import serve, ui
from vistune.tokens import IMAGE_PLACEHOLDER
from vistune.train.signals import TrainingInterrupted

if TYPE_CHECKING:  # the config (pydantic) loads inside the commands, keeping `vistune --help` instant
    from vistune.config import RunConfig

ConfigPath = Annotated[Path, Positional, arg(metavar="CONFIG")]
#: Overrides are `key=value` words after the config, as many as given.
Overrides = Annotated[tuple[str, ...], Positional, arg(metavar="KEY=VALUE")]
Src = Annotated[Path, Positional, arg(metavar="SRC")]
Dst = Annotated[Path, Positional, arg(metavar="DST")]
Question = Annotated[str, Positional, arg(metavar="QUESTION", help="the question")]
Images = Annotated[tuple[Path, ...], arg(metavar="IMAGE", help="an image (the flag repeated for several)")]


def train(config: ConfigPath, overrides: Overrides = (),
          stages: Annotated[tuple[str, ...], arg(name="stage")] = (), dry_run: bool = False,
          processes: int | None = None, allow_config_change: bool = False) -> None:
    """Train the stages of a run config in order (resuming where a previous run stopped).

    Args:
        config: run config YAML (see configs/)
        overrides: config overrides, e.g. stages.align.lr=2e-3 model.llm.path=/ckpt
        stages: run only this stage
        dry_run: check every stage (paths, parts, batch arithmetic, engines), print the resolved config, train nothing
        processes: --dry-run: check the batch arithmetic for N processes (default: the launcher's WORLD_SIZE, or 1)
        allow_config_change: resume a checkpoint made under another config or data (else: stop, list the changes)
    """
    from vistune.config import load_config
    from vistune.errors import ConfigError
    from vistune.train.loop import run

    if processes is not None and not dry_run:
        raise ConfigError("--processes only applies with --dry-run (a real run takes the launcher's process count)")
    cfg = load_config(config, list(overrides))
    if dry_run:
        _dry_run(cfg, list(stages) or None, processes)
        return
    outputs = run(cfg, list(stages) or None, allow_config_change)
    for name, out in outputs.items():
        print(f"{name}: {out}")


def _dry_run(cfg: RunConfig, stages: list[str] | None, processes: int | None) -> None:
    """Check every stage as `train` would before starting, print the resolved config, train nothing."""
    from vistune.train.validate import check_run, launch_processes, resolved_config

    n = processes or launch_processes()
    check_run(cfg, n, stages)
    print(resolved_config(cfg, n))
    print(f"# dry run: every stage checked for {n} process(es); nothing trained")


def data_show(config: ConfigPath, overrides: Overrides = (),
              stage: str | None = None, limit: int | None = None, json: bool = False) -> None:
    """Print each sample of a stage as it will train on it (after the data rules and the format, before
    tokenization), supervised spans between ⟦ ⟧; --json: one {"id", "text", "supervised"} object per line.

    Args:
        config: run config YAML (the one given to vistune train)
        overrides: config overrides, as for vistune train
        stage: the stage whose data to show (needed when there are several)
        limit: show only the first N samples
        json: one JSON object per line
    """
    from vistune.config import load_config
    from vistune.data.records import Problems
    from vistune.data.show import show_stage
    from vistune.model.llm import load_tokenizer

    cfg = load_config(config, list(overrides))
    tokenizer = load_tokenizer(cfg.model.llm.path, cfg.model.llm.gguf_file)
    problems = Problems()
    for shown in show_stage(cfg, stage, limit, tokenizer, problems):
        if json:
            print(shown.to_json())
            continue
        print(f"=== {shown.id} ({len(shown.supervised)} supervised span(s))")
        print(shown.marked())
        if shown.error:
            print(f"!!! {shown.error}")
    if problems.total:
        print(problems.summary(), file=sys.stderr)


def _open_images(paths: tuple[Path, ...]) -> list:
    """The --image files, decoded now: a wrong path fails before the model loads, not at the first message."""
    from vistune.images import load_image

    images = []
    for path in paths:
        if not path.is_file():
            raise VistuneError(f"--image {path}: no such file")
        images.append(load_image(path, f"--image {path}"))
    return images


EMPTY_REPLY_HINT = ("vistune: the reply is empty: the model ended its turn at once. Models after the align stage "
                    "alone, or trained for few steps, often do; ask a finetuned checkpoint, or sample "
                    "(--temperature 0.7)")


def ask(model: ModelPath, question: Question, image: Images = (),
        generation: Generation = Generation(), device: Device = None, parts: Parts = Parts()) -> None:
    """Print only the answer to one question about an image, or several (--image repeated; `<image>` in the
    question places them, else they go first), for scripts."""
    from vistune.chat.formats import Message
    from vistune.infer.engine import load

    images = _open_images(image)
    engine = load(model, device, **parts.kwargs())
    reply = engine.generate([[Message("user", question)]], [images], generation.sampling())[0]
    print(reply)
    if not reply:
        print(EMPTY_REPLY_HINT, file=sys.stderr)


def chat(model: ModelPath, image: Images = (), generation: Generation = Generation(), device: Device = None,
         parts: Parts = Parts()) -> None:
    """Multi-turn chat about an image or several (--image repeated), answers streamed. Empty line or Ctrl-D
    ends it; /reset starts over."""
    from vistune.chat.formats import Message
    from vistune.infer.engine import load

    images = _open_images(image)
    engine = load(model, device, **parts.kwargs())
    sampling = generation.sampling()
    history: list[Message] = []
    print(f"vistune chat: {model} ({engine.bundle.spec.conversation_format} format)"
          f"{', images ' + ', '.join(map(str, image)) if images else ''}. Empty line or Ctrl-D to quit, "
          "/reset to start over.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            break
        if not text:
            break
        if text == "/reset":
            history = []
            continue
        if not history and images and IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER * len(images) + "\n" + text
        history.append(Message("user", text))
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in engine.stream(history, images, sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append(Message("assistant", "".join(pieces).strip()))


def info(model: ModelPath, parts: Parts = Parts()) -> None:
    """Describe a checkpoint (vistune, llava-hf or original LLaVA): format, parts, parameter counts,
    projector, image tokens, conversation format."""
    import json

    from vistune.convert.api import load_any
    from vistune.convert.llava_hf import EXPORT_FILE
    from vistune.infer.load import check_model_folder
    from vistune.train import describe_parts

    check_model_folder(model)
    bundle, detected = load_any(model, **parts.kwargs(), merge=False)
    spec = bundle.spec
    native = detected.format == "vistune"
    # Only vistune checkpoints and vistune's own llava-hf exports record the conversation format.
    stored = native or (detected.folder / EXPORT_FILE).is_file()

    def where(path: str) -> str:
        return path if Path(path).is_absolute() else f"{path}/ in the checkpoint"
    total = {name: n for name, (_, n) in describe_parts(bundle.model).items()}
    adapter = spec.llm_adapter or ("in the source folder" if hasattr(bundle.model.llm, "peft_config") else None)
    rows = {
        "format": "vistune v1" if native else f"{detected.format} (read by vistune convert)",
        "conversation_format": spec.conversation_format + ("" if stored else " (not recorded in this folder: "
                                                           "the default; choose with convert --format)"),
        "system_prompt": spec.system_prompt or "(format default)",
        "model_max_length": spec.model_max_length,
        "image_tokens_per_image": spec.num_image_tokens,
        **_image_mode_row(bundle.model.layout),
        "image_preprocess": spec.vision.image_preprocess,
        "vision": f"{where(spec.vision.path)} (layer {spec.vision.select_layer}, {spec.vision.select_feature}), "
                  f"{total['vision']:,} parameters",
        "projector": f"{spec.projector}, {total['projector']:,} parameters",
        "llm": f"{where(spec.llm.path)}{' (' + spec.llm.gguf_file + ')' if spec.llm.gguf_file else ''}"
               f"{' + LoRA adapter ' + adapter if adapter else ''}, "
               f"{total['llm']:,} parameters",
    }
    for key, value in rows.items():
        print(f"{key:<24}{value}")
    if spec.provenance:
        print(f"{'provenance':<24}{json.dumps({k: v for k, v in spec.provenance.items() if k != 'hyperparameters'})}")


def _image_mode_row(layout: object) -> dict[str, str]:
    """`info`'s line for hd/anyres models (per-image tokens then depend on the image's size)."""
    mode = getattr(layout, "mode", "single")
    if mode == "hd":
        return {"image_mode": f"hd, grid {list(layout.hd_grid)} + the whole image: "  # type: ignore[attr-defined]
                              f"{layout.num_tokens(1, 1)} tokens per image"}  # type: ignore[attr-defined]
    if mode == "anyres":
        return {"image_mode": f"anyres, pinpoints {[list(p) for p in layout.pinpoints]} "  # type: ignore[attr-defined]
                              "(tokens per image depend on its size)"}
    return {}


def convert(src: Src, dst: Dst,
            to: Literal["vistune", "llava-hf", "llava-next"], parts: Parts = Parts(), keep_adapter: bool = False,
            format: str | None = None, system_prompt: str | None = None, dtype: Dtype | None = None) -> None:
    """Convert a checkpoint (vistune, llava-hf, llava-next, original LLaVA full / stage-1 projector / LoRA; detected
    from its config) to vistune, llava-hf or (anyres models) llava-next.

    Args:
        src: source folder; its format is read from its files and config
        dst: new output folder
        to: the format to write
        keep_adapter: LoRA sources: keep the adapter (vistune only) instead of merging it
        format: conversation format of a source that records none (original LLaVA, foreign llava-hf; None: vicuna_v1)
        system_prompt: the system prompt to record (default: the format's own)
        dtype: default: the source's own
    """
    import torch

    from vistune.convert.api import convert as run_convert

    out, detected = run_convert(src, dst, to, **parts.kwargs(), merge=not keep_adapter, fmt=format,
                                system_prompt=system_prompt, dtype=getattr(torch, dtype) if dtype else None)
    print(f"{src} ({detected.format}) -> {out} ({to})")


def merge_lora(src: Src, dst: Dst,
               base: Path | None = None, vision: Path | None = None) -> None:
    """Merge a LoRA finetune's adapter into its LLM (vistune, or original LLaVA with --base); writes vistune.

    Args:
        src: vistune checkpoint with llm_adapter, or an original LLaVA LoRA folder
        dst: new output folder (vistune)
        base: original LLaVA LoRA: local copy of the base LLM
        vision: original LLaVA LoRA: local copy of the vision tower
    """
    from vistune.convert.api import merge_lora as run_merge

    print(f"merged: {run_merge(src, dst, base=base, vision=vision)}")


def demo(out: Path = Path("runs/demo"), llm: str = "standin", seed: int = 0, size: str = "default",
         config: Path | None = None) -> None:
    """The whole LLaVA pipeline in miniature on a CPU: world, stand-in parts, data, 2 stages, eval, report.

    Args:
        out: output folder
        llm: standin (a small LLM trained on the world's text) or smollm2 (SmolLM2-135M-Instruct; much slower)
        seed: the seed of the world, the parts and the training
        size: default, or tiny (seconds; checks the pipeline, learns nothing)
        config: run config (default: the one shipped with vistune, src/vistune/demo/configs/<llm>.yaml)
    """
    from vistune.demo.pipeline import run_demo

    run_demo(out, llm=llm, seed=seed, size=size, config=config)


#: Command name -> its function; a nested dict is a command group (`vistune data show`).
COMMANDS: dict[str, Any] = {
    "train": train, "data": {"show": data_show}, "ask": ask, "chat": chat, "info": info, "convert": convert,
    "merge-lora": merge_lora, "datagen": datagen_cli.COMMANDS, "serve": serve, "ui": ui, "demo": demo,
    "eval": eval_tasks,
}
GROUP_HELP = {"data": "inspect training data as a stage sees it", "datagen": datagen_cli.__doc__.split("\n")[0]}
#: Lists are repeated flags (`--image a --image b`); dataclass groups add their fields without a prefix;
#: a boolean is one flag (`--dry-run`, no `--no-dry-run`).
MARKERS = (UseAppendAction, OmitArgPrefixes, FlagCreatePairsOff)
#: Commands whose stray `key=value` words are config overrides (argparse stops taking positionals at the
#: first option, so `train CONFIG --stage x a.b=1` leaves `a.b=1` over).
TAKES_OVERRIDES = (train, data_show)


def _parse_only(command: Callable[..., None]) -> Callable[..., functools.partial]:
    """`command` with its signature, returning the call instead of making it: parsing and running stay apart."""
    @functools.wraps(command)
    def bind(*args: Any, **kwargs: Any) -> functools.partial:
        return functools.partial(command, *args, **kwargs)
    return bind


def _subcommands(table: dict[str, Any]) -> Any:
    """The tyro union of the commands in `table`, one subcommand each; nested tables become groups."""
    options = []
    for name, target in table.items():
        if isinstance(target, dict):
            options.append(Annotated[Any, subcommand(name, constructor_factory=functools.partial(_subcommands, target),
                                                     description=GROUP_HELP[name])])
        else:
            options.append(Annotated[Any, subcommand(name, constructor=_parse_only(target))])
    if len(options) == 1:  # a union of one is its member; a hidden second arm keeps the group a group
        options.append(Annotated[None, Suppress])
    return Union[tuple(options)]  # noqa: UP007 (a union built at run time)


def parse(argv: list[str]) -> functools.partial:
    """The command `argv` names, with its arguments bound (SystemExit on --help, --version or a usage error)."""
    from vistune import __version__

    if argv[:1] == ["--version"]:
        print(f"vistune {__version__}")
        raise SystemExit(0)
    call, extra = tyro.cli(_subcommands(COMMANDS), prog="vistune", args=argv, config=MARKERS,
                           return_unknown_args=True,
                           description="Visual instruction tuning (LLaVA, LLaVA-1.5). `vistune --version` prints "
                                       "the version.")
    if call.func in TAKES_OVERRIDES and all("=" in word and not word.startswith("-") for word in extra):
        return functools.partial(call, overrides=(*call.keywords["overrides"], *extra))
    if extra:
        print(f"usage: vistune {argv[0]} ...\nvistune: error: unrecognized arguments: {' '.join(extra)}",
              file=sys.stderr)
        raise SystemExit(2)
    return call


def main(argv: list[str] | None = None) -> int:
    command = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        command()
    except VistuneError as e:
        print(f"vistune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vistune: interrupted (nothing saved since the last resume checkpoint, if any)", file=sys.stderr)
        return 130
    except TrainingInterrupted as e:  # a signal during training: a checkpoint was saved at a step boundary
        print(f"vistune: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
