"""Dataclass fields that carry their own command-line help, and their text form.

A method's settings are declared once, as fields of its config dataclass (see
:mod:`sdsprune.methods`); the command-line flags, the ``key=value`` text of method strings
and the report are all derived from those fields, so a default or a type is never written
twice.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import Field, field, fields

from sdsprune.errors import SdspruneError

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def setting(default: object, help: str, flag: str | None = None) -> object:
    """A config field with its flag's help text (and flag name, when it is not the field's
    name with dashes)."""
    return field(default=default, metadata={"help": help, "flag": flag})


def nested(help: str, flag: str | None = None) -> dict[str, object]:
    """The metadata of a config field that holds another method's config (SDS's base, OWL's
    inner method); with a ``flag``, the command line takes it as a method string."""
    return {"help": help, "flag": flag, "nested": True}


def is_nested(item: Field) -> bool:
    return item.metadata.get("nested", False)


def setting_fields(cls: type) -> list[Field]:
    """The plain settings of a config class: every field but the nested methods."""
    return [item for item in fields(cls) if not is_nested(item)]


def settings_of(config: object) -> dict[str, object]:
    """The plain settings of a config, in field order (what a report stores)."""
    return {item.name: getattr(config, item.name) for item in setting_fields(type(config))}


def flag_name(item: Field) -> str:
    return item.metadata.get("flag") or item.name.replace("_", "-")


@functools.cache
def setting_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (type, optional)}`` with the annotations resolved (they are strings under
    postponed evaluation)."""
    hints = typing.get_type_hints(cls)
    resolved = {}
    for item in setting_fields(cls):
        hint = hints[item.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = [arg for arg in args if arg is not type(None)]
        resolved[item.name] = (kinds[0], len(kinds) < len(args))
    return resolved


def parse_options(cls: type, label: str, text: str, separator: str) -> dict[str, object]:
    """``{field: value}`` from ``"key=value<separator>key=value"``; keys may use dashes."""
    kinds = setting_types(cls)
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(separator))):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            known = ", ".join(kinds) or "none"
            raise SdspruneError(f"bad option '{item}' for {label} (use key=value; keys: {known})")
        options[key] = parse_value(label, key, raw.strip(), *kinds[key])
    return options


def parse_value(label: str, key: str, raw: str, kind: type, optional: bool) -> object:
    """``raw`` as a value of the field's type."""
    if optional and raw.lower() in ("", "none"):
        return None
    try:
        if kind is bool:
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError(raw)
            return raw.lower() in _TRUE
        return kind(raw)
    except ValueError:
        raise SdspruneError(f"{label} option {key}={raw}: expected a {kind.__name__}") from None


def format_options(values: dict[str, object], separator: str) -> str:
    """The text :func:`parse_options` reads back into ``values``."""
    return separator.join(f"{key}={format_value(value)}" for key, value in values.items())


def format_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
