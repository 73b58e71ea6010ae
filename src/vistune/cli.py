"""The `vistune` command: each subcommand is one typed function; argparse builds --help from them.

Heavy imports (torch, transformers) happen inside the commands, so `vistune --help` is instant.
Errors a user can fix (VistuneError) print as one line, without a traceback, and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vistune.errors import VistuneError


def train(config: Path, overrides: list[str], stages: list[str] | None = None) -> None:
    """Train the stages of a run config in order (resuming where a previous run stopped)."""
    from vistune.config import load_config
    from vistune.train.loop import run

    cfg = load_config(config, overrides)
    outputs = run(cfg, stages)
    for name, out in outputs.items():
        print(f"{name}: {out}")


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):  # noqa: ANN202
    from vistune.infer.engine import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def ask(model: Path, question: str, image: Path | None, max_new_tokens: int, temperature: float, top_p: float,
        seed: int | None, device: str | None) -> None:
    """Print only the answer to one question about an image (for scripts)."""
    from vistune.infer.engine import load

    engine = load(model, device)
    print(engine.ask(image, question, _sampling(max_new_tokens, temperature, top_p, seed)))


def chat(model: Path, image: Path | None, max_new_tokens: int, temperature: float, top_p: float,
         seed: int | None, device: str | None) -> None:
    """Multi-turn chat about an image, answers streamed. Empty line or Ctrl-D ends it; /reset starts over."""
    from vistune.chat.formats import Message
    from vistune.infer.engine import load

    engine = load(model, device)
    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    history: list[Message] = []
    images = [image] if image else []
    print(f"vistune chat: {model} ({engine.bundle.spec.conversation_format} format)"
          f"{', image ' + str(image) if image else ''}. Empty line or Ctrl-D to quit, /reset to start over.")
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
        if not history and images and "<image>" not in text:
            text = "<image>\n" + text
        history.append(Message("user", text))
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in engine.stream(history, images, sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append(Message("assistant", "".join(pieces).strip()))


def info(model: Path) -> None:
    """Describe a vistune checkpoint: parts, parameter counts, projector, image tokens, format."""
    import json

    from vistune.model.checkpoint import load_checkpoint
    from vistune.train.parts import count

    bundle = load_checkpoint(model)
    spec = bundle.spec

    def where(path: str) -> str:
        return path if Path(path).is_absolute() else f"{path}/ in the checkpoint"
    rows = {
        "format": "vistune v1",
        "conversation_format": spec.conversation_format,
        "system_prompt": spec.system_prompt or "(format default)",
        "model_max_length": spec.model_max_length,
        "image_tokens_per_image": spec.num_image_tokens,
        "image_preprocess": spec.vision.image_preprocess,
        "vision": f"{where(spec.vision.path)} (layer {spec.vision.select_layer}, {spec.vision.select_feature}), "
                  f"{count(bundle.model.vision)[1]:,} parameters",
        "projector": f"{spec.projector}, {count(bundle.model.projector)[1]:,} parameters",
        "llm": f"{where(spec.llm.path)}{' (' + spec.llm.gguf_file + ')' if spec.llm.gguf_file else ''}"
               f"{' + LoRA adapter ' + spec.llm_adapter if spec.llm_adapter else ''}, "
               f"{count(bundle.model.llm)[1]:,} parameters",
    }
    for key, value in rows.items():
        print(f"{key:<24}{value}")
    if spec.provenance:
        print(f"{'provenance':<24}{json.dumps({k: v for k, v in spec.provenance.items() if k != 'hyperparameters'})}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune", description="Visual instruction tuning (LLaVA, LLaVA-1.5).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    t.add_argument("config", type=Path, help="run config YAML (see configs/)")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. stages.align.lr=2e-3 model.llm.path=/ckpt")
    t.add_argument("--stage", dest="stages", action="append", help="run only this stage (repeatable)")

    def generation(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-new-tokens", type=int, default=512)
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--seed", type=int, default=None, help="seed for sampling")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    a = sub.add_parser("ask", help=ask.__doc__, description=ask.__doc__)
    a.add_argument("model", type=Path, help="vistune checkpoint folder")
    a.add_argument("question")
    a.add_argument("--image", type=Path, default=None)
    generation(a)

    c = sub.add_parser("chat", help=chat.__doc__, description=chat.__doc__)
    c.add_argument("model", type=Path, help="vistune checkpoint folder")
    c.add_argument("--image", type=Path, default=None)
    generation(c)

    i = sub.add_parser("info", help=info.__doc__, description=info.__doc__)
    i.add_argument("model", type=Path, help="vistune checkpoint folder")
    return p


COMMANDS = {"train": train, "ask": ask, "chat": chat, "info": info}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_known_args: `train CONFIG --stage x a.b=1` would otherwise stop at the override after
    # an option; stray key=value words are overrides, anything else is an error.
    namespace, extra = parser.parse_known_args(argv)
    args = vars(namespace)
    if args["command"] == "train" and all("=" in word and not word.startswith("-") for word in extra):
        args["overrides"] = [*args["overrides"], *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    command = COMMANDS[args.pop("command")]
    try:
        command(**args)
    except VistuneError as e:
        print(f"vistune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vistune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
