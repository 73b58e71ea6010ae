"""Strict records: the pydantic base of every vistune config and spec, and the message that explains
a validation error by naming a bad field's valid neighbours.

A leaf (pydantic only), so that the config (`vistune.config`) and the model layer's checkpoint spec
(`vistune.model.checkpoint.ModelSpec`) share one base without importing each other.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, ClassVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A record that forbids unknown fields (a typo fails, naming the field, instead of being ignored)
    and validates assignments too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Names people are likely to type into this section by habit (e.g. Hugging Face Trainer arguments),
    # each with the hint shown instead of the closest valid field.
    unknown_field_hints: ClassVar[dict[str, str]] = {}


def registry_key(check: Callable[[Any], Any], key: Any) -> Any:
    """Run a registry's key check inside a pydantic validator (which reports ValueErrors by field)."""
    try:
        return check(key)
    except KeyError as e:
        raise ValueError(str(e)) from None


def explain(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per error of validating `root`, prefixed by `source`; an unknown field is named with the
    valid fields of its section and the closest one."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown config field {loc!r}{_suggest(root, loc)}")
        else:
            lines.append(f"{source}: {loc or '<root>'}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _section(root: type[BaseModel], parts: list[str]) -> type[BaseModel] | None:
    """The model that the dotted location `parts` points into (None if it is not a section). A field
    typed `dict[str, Model]` (the stages) takes a key, then `Model`'s fields."""
    model = root
    expect_key = False
    for p in parts:
        if expect_key:  # a key of a dict of sections (a stage name under `stages`)
            expect_key = False
            continue
        field = model.model_fields.get(p)
        if field is None:
            return None
        ann = field.annotation
        if get_origin(ann) is dict and (value := _model(get_args(ann)[1])) is not None:
            model, expect_key = value, True
        elif (inner := _model(ann)) is not None:
            model = inner
        else:
            return None
    return model


def _suggest(root: type[BaseModel], loc: str) -> str:
    """Name the valid fields of the section an unknown key sits in, and the closest one."""
    parts = loc.split(".")
    model = _section(root, parts[:-1])
    if model is None:
        return ""
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(parts[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    hints: dict[str, str] = getattr(model, "unknown_field_hints", {})
    if parts[-1] in hints:
        hint = f" ({hints[parts[-1]]})"
    return f"{hint}; valid fields: {', '.join(valid)}"
