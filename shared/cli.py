"""argparse flags generated from a config model, so each flag's help is its field's docstring.

Nested models become dotted names with dashes: `LearnerConfig.loss.beta` is `--loss-beta`.
Only flags the user passed are returned, so they override a config file and nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "") -> None:
    """Add one `--flag` per (nested) field of `model`, defaulting to 'not given'."""
    group = parser.add_argument_group(prefix.rstrip(".") or model.__name__) if prefix else parser
    for name, field in model.model_fields.items():
        dest = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            add_model_flags(parser, annotation, dest + ".")
            continue
        flag = flag_name(dest)
        default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
        help_text = f"{field.description or ''} ({default})".replace("%", "%%")
        kind, choices = _scalar(annotation)
        if kind is bool:
            parser_ = group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is list:
            parser_ = group.add_argument(flag, dest=dest, nargs="*", metavar="ITEM", help=help_text)
        else:
            parser_ = group.add_argument(flag, dest=dest, type=kind, choices=choices, help=help_text)
        parser_.default = argparse.SUPPRESS


def flag_name(dest: str) -> str:
    """The flag of a (dotted) field name: `loss.beta` -> `--loss-beta`, `max_model_len` -> `--max-model-len`."""
    return "--" + dest.replace(".", "-").replace("_", "-")


def given_overrides(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The flags of `model` the user passed, as a nested dict ready to merge over a config file."""
    out: dict[str, Any] = {}
    for dest in _dests(model):
        if dest not in vars(args):
            continue
        node = out
        *parents, leaf = dest.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = getattr(args, dest)
    return out


def _dests(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _dests(annotation, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, recursing into nested dicts."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _scalar(annotation: Any) -> tuple[Any, list[str] | None]:
    """The argparse `type` (and choices) for a field annotation."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, [str(a) for a in get_args(annotation)]
    if get_origin(annotation) is list:
        return list, None
    if annotation in (int, float, str, bool):
        return annotation, None
    if annotation is Path:
        return Path, None
    return json.loads, None


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def model_dir_problem(model: str) -> str | None:
    """What is wrong with a --model value, before anything loads it (None: nothing found). A value
    shaped like a Hub id ('org/name', not a path that exists) is left to transformers and vLLM."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"--model {model}: the directory has no config.json (not a Hugging Face model directory)"
        return None
    if path.exists():
        return f"--model {model}: not a directory (a Hugging Face model directory: config.json, weights, tokenizer)"
    if _HUB_ID.fullmatch(model) and not model.startswith((".", "~")):
        return None
    return (
        f"--model {model}: no such directory (a Hugging Face model directory: config.json, weights, tokenizer; "
        "`grpo-tiny-model DIR` builds one)"
    )
