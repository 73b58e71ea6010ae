"""`vistune serve` and `vistune ui`: the API server (and its chat page) around one loaded model.

Both take the one `ServingLimits` group, so a limit has one flag, one help text and one default.
Heavy imports (torch, uvicorn, gradio) stay inside the commands.
"""

from __future__ import annotations

from typing import Annotated, Literal

from tyro.conf import arg

from vistune.cli_options import Device, Dtype, ModelPath
from vistune.errors import VistuneError
from vistune.serve.limits import ServingLimits

ApiKey = Annotated[str | None, arg(help="require 'Authorization: Bearer KEY' (or set $VISTUNE_API_KEY); the chat "
                                       "page asks for it")]
Host = Annotated[str, arg(help="interface to listen on (127.0.0.1: this machine only)")]


def serve(model: ModelPath, host: Host = "127.0.0.1", port: int = 8000, api_key: ApiKey = None,
          served_model_name: str | None = None, device: Device = None, dtype: Dtype | None = None,
          chat_template: Annotated[str | None, arg(metavar="FILE_OR_JINJA")] = None, max_model_len: int | None = None,
          ui: bool = False, log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
          limits: ServingLimits = ServingLimits()) -> None:
    """OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health, GET /stats), batched;
    --ui adds the chat page.

    Args:
        port: the port to listen on
        served_model_name: the model id clients send (default: the folder name)
        dtype: weights' dtype (default: bfloat16 on CUDA, float32 on CPU)
        chat_template: a Jinja chat template (a file, or the template itself) instead of the checkpoint's format
        max_model_len: context length (default: the model's own)
        ui: also serve the chat page at /ui (behind a login with --api-key)
        log_level: uvicorn's log level
    """
    import os

    import torch

    try:
        import uvicorn
    except ImportError as e:
        raise VistuneError(f"serving needs the serve extra ({e}): pip install 'vistune[serve]'") from None

    from vistune.infer.engine import load
    from vistune.serve.api import create_app
    from vistune.serve.server import Config

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not call home
    api_key = api_key or os.environ.get("VISTUNE_API_KEY") or None
    engine = load(model, device, getattr(torch, dtype) if dtype else None)
    if chat_template is not None:
        from vistune.serve.template import use_chat_template

        engine = use_chat_template(engine, chat_template)
    name = served_model_name or model.resolve().name
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
    app = create_app(engine, name, api_key=api_key, limits=limits.request_limits(),
                     max_batch_size=limits.max_batch_size, max_wait_ms=limits.max_wait_ms,
                     ui_path="/ui" if ui else None, ui_api_base=f"{base}/v1", max_model_len=max_model_len)
    print(f"vistune serve: {name} at {base}/v1{' (API key required)' if api_key else ''}"
          f"{f', chat page at {base}/ui' if ui else ''}", flush=True)
    uvicorn.Server(Config(app, host, port, limits.server_limits(), log_level=log_level)).run()


def ui(model: ModelPath, host: Host = "127.0.0.1", port: int = 7860, api_key: ApiKey = None, device: Device = None,
       limits: ServingLimits = ServingLimits()) -> None:
    """The web chat page (Gradio: image upload, streamed answers, settings) on its own API server, at /ui.

    Args:
        port: the port to listen on
    """
    serve(model, host, port, api_key, device=device, ui=True, limits=limits)
