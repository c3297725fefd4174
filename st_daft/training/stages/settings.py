"""A stage's settings as data: one declaration a field (its default, its ``st-daft train`` flag and help), and the
round trip of a stage to and from a plain dict (``daft_recipe.json``), each value checked against its field's type.

A field declared with :func:`setting` carries its command-line flag in the dataclass field's metadata, so the
command line (:mod:`st_daft.cli.train`) is derived from the stages, not copied from them. ``budget=True`` marks a
step budget or learning rate: given for a stage a run does not train it is only warned about; any other stage flag
is then refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "unit_float",
    "setting",
    "flag_fields",
    "stage_to_dict",
    "stage_from_dict",
    "coerce_setting",
    "SettingError",
]


# flag value types: each refuses a bad value naming what it expected (argparse adds the flag)


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {value}")
    return number


def unit_float(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


class SettingError(ValueError):
    """A recipe's stage or field is unknown, or a value does not fit its field's type."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    help: str = "",  # noqa: A002 - argparse's name
    budget: bool = False,
    to_field: Callable[[Any], Any] | None = None,
    implies: dict[str, Any] | None = None,
    **argparse_options: Any,
) -> Any:
    """A stage field with its ``st-daft train`` flag.

    Args:
        default: the field's default, as for :func:`dataclasses.field`.
        default_factory: builds the default of a mutable field, as for :func:`dataclasses.field`.
        flag: the command-line flag (e.g. ``"--align-steps"``); None for a field the command line leaves to
            ``--set STAGE.FIELD=VALUE``.
        help: the flag's help text.
        budget: a step budget or learning rate (warned about, not refused, for a stage the run does not train).
        to_field: turns the parsed flag into the field's value (e.g. ``--no-zipf`` into ``zipf_weighting=False``).
        implies: other fields of the same stage the flag sets too, unless their own flag is given.
        argparse_options: passed to ``add_argument`` (``type``, ``choices``, ``action``, ``metavar``).
    """
    metadata = {
        "flag": flag,
        "help": help,
        "budget": budget,
        "to_field": to_field,
        "implies": implies or {},
        "argparse": argparse_options,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def switch(default: bool, *, flag: str, help: str) -> Any:  # noqa: A002 - argparse's name
    """A boolean stage field whose flag, given without a value, sets the opposite of its default (``--no-zipf``)."""
    return setting(default, flag=flag, help=help, action="store_const", const=not default)


def flag_fields(stage_type: type) -> list[dataclasses.Field]:
    """The fields of a stage class that have a command-line flag, in declaration order."""
    return [field for field in dataclasses.fields(stage_type) if field.metadata.get("flag")]


def _fits(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Whether ``value`` (as JSON gives it) fits ``annotation``, and the value converted to it."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _fits(value, option)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item = (typing.get_args(annotation) or (Any,))[0]
        converted = []
        for element in value:
            ok, element = _fits(element, item)
            if not ok:
                return False, value
            converted.append(element)
        return True, origin(converted)
    if origin is dict or annotation is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    return isinstance(value, annotation) if isinstance(annotation, type) else True, value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__


def coerce_setting(stage_type: type, name: str, value: Any) -> Any:
    """``value`` for the field ``name`` of a stage class, checked against the field's type; a
    :class:`SettingError` naming ``stage.field`` otherwise."""
    fields = {field.name: field for field in dataclasses.fields(stage_type) if field.init}
    where = f"{stage_type.name}.{name}"
    if name not in fields:
        known = ", ".join(sorted(fields))
        raise SettingError(f"unknown setting {where}: the {stage_type.name} stage has {known}")
    annotation = typing.get_type_hints(stage_type)[name]
    ok, converted = _fits(value, annotation)
    if not ok:
        raise SettingError(f"{where} must be {_type_name(annotation)}, got {value!r}")
    return converted


def stage_to_dict(stage: Any) -> dict[str, Any]:
    """Every setting of a stage, as JSON can hold it, under ``"stage"``: its name."""
    values = {}
    for field in dataclasses.fields(stage):
        if field.init:
            value = getattr(stage, field.name)
            values[field.name] = list(value) if isinstance(value, tuple) else value
    return {"stage": stage.name, **values}


def stage_from_dict(record: dict[str, Any], stage_types: dict[str, type]) -> Any:
    """The stage a :func:`stage_to_dict` record describes; unknown stages, fields and wrong types refused by name."""
    if not isinstance(record, dict) or "stage" not in record:
        raise SettingError(f"a recipe stage is a dict with a 'stage' name, got {record!r}")
    name = record["stage"]
    if name not in stage_types:
        raise SettingError(f"unknown stage {name!r}: choose from {', '.join(stage_types)}")
    stage_type = stage_types[name]
    values = {key: coerce_setting(stage_type, key, value) for key, value in record.items() if key != "stage"}
    try:
        return stage_type(**values)
    except ValueError as error:
        raise SettingError(f"{name} stage: {error}") from None
