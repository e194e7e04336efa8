"""How a setting is declared: one dataclass field that carries its help, bounds, choices and whether it changes a
model's output. Validation (`check`), the CLI's options and the `--config` keys all read these fields, so adding a
setting is adding one field to one section (see `intgen.config`), and using it where it acts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import Field
from enum import Enum
from typing import Any


def setting(
    default: Any = None,
    help: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    choices: type[Enum] | None = None,
    output: bool = False,
    backends: tuple[str, ...] = (),
    option: str | None = None,
    join: bool = False,
) -> Any:
    """A settings field. `low`/`high`: the allowed range; `choices`: the Enum whose values it takes; `output`: a
    change can change a model's reply (for backend settings, on the `backends` named); `option`: its CLI flag where
    not --name (a list takes it once per value); `join`: a text setting given as a repeatable option, its values
    joined by commas (several servers)."""
    metadata = {"help": help, "low": low, "high": high, "choices": choices, "output": output,
                "backends": backends, "option": option, "join": join}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def kind_of(owner: type, name: str) -> tuple[str, bool]:
    """The value kind a field of `owner` takes (bool, int, float, str, list, table) and whether it may be None."""
    hint = typing.get_type_hints(owner)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        return "list", optional
    if origin is dict:
        return "table", optional
    return {bool: "bool", int: "int", float: "float", str: "str"}[base], optional


EXPECTED = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
            "list": "a list of names", "table": "a table"}


def check(owner: type, spec: Field, value: Any) -> str | None:
    """What is wrong with one value of the field `spec` of `owner`, or None."""
    kind, optional = kind_of(owner, spec.name)
    if value is None:
        return None if optional else "must be set"
    wrong = {
        "bool": not isinstance(value, bool),
        "int": isinstance(value, bool) or not isinstance(value, int),
        "float": isinstance(value, bool) or not isinstance(value, (int, float)),
        "str": not isinstance(value, str),
        "list": not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value),
        "table": not isinstance(value, dict),
    }[kind]
    if wrong:
        return f"expected {EXPECTED[kind]}, got {value!r}"
    choices = spec.metadata.get("choices")
    if choices is not None:
        known = [c.value for c in choices]
        if kind == "list":
            bad = [v for v in value if v not in known]
            if bad:
                return f"unknown {spec.name.removesuffix('s')}(s) {', '.join(bad)}; known: {', '.join(known)}"
        elif value not in known:
            return f"{value!r} is not one of {', '.join(known)}"
    low, high = spec.metadata.get("low"), spec.metadata.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        return f"must be {span}, got {value!r}"
    return None


def described(spec: Field) -> str:
    """The field's help with its range, as the CLI and the docs show it."""
    text = spec.metadata.get("help", "")
    low, high = spec.metadata.get("low"), spec.metadata.get("high")
    if low is not None and high is not None:
        text += f" [{low}..{high}]"
    elif low is not None and low != 1 and low != 0:
        text += f" [at least {low}]"
    return text
