"""`vistune serve --chat-template`: serve a checkpoint with a Jinja chat template of the user's choosing.

As vLLM's flag of the same name: the value is a file holding the template, or the template itself.
The served engine then renders prompts with that template (the `chat_template` conversation format)
instead of the format recorded in the checkpoint. The checkpoint on disk is not touched.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vistune.errors import VistuneError
from vistune.infer.engine import Engine


def read_chat_template(value: str) -> str:
    """The template text: the file `value` names, or `value` itself when it is Jinja (has `{`)."""
    path = Path(value)
    if "{" not in value:
        if not path.is_file():
            raise VistuneError(f"--chat-template {value!r}: no such file, and not a Jinja template either "
                               "(give a file, or the template text itself)")
        value = path.read_text(encoding="utf-8")
    try:  # transformers renders chat templates in this sandbox; check the syntax now, not at the first request
        ImmutableSandboxedEnvironment().parse(value)
    except TemplateSyntaxError as e:
        raise VistuneError(f"--chat-template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return value


def use_chat_template(engine: Engine, template: str) -> Engine:
    """An engine over the same model whose prompts are rendered with `template` (file or Jinja)."""
    tokenizer = copy.deepcopy(engine.tokenizer)  # the given engine keeps its own template
    tokenizer.chat_template = read_chat_template(template)
    spec = engine.bundle.spec.model_copy(update={"conversation_format": "chat_template"})
    return Engine(dataclasses.replace(engine.bundle, tokenizer=tokenizer, spec=spec))
