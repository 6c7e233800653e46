"""The command line's method flags, generated from the method configs' fields.

Every setting of every method (:mod:`sdsprune.methods`) becomes one flag with the field's
help, type and default: SDS's keep their plain names (``--schedule``, ``--mu``), the others
carry their method's name (``--owl-lambda``, ``--dsnot-max-cycles``). Only the flags a
command line gives count: the others leave the method string's own options and the
configs' defaults in place, so no default is written twice.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Annotated

import typer

from sdsprune.errors import SdspruneError
from sdsprune.methods import CONFIG_CLASSES, OWL, SDS, Method, format_method, parse_method
from sdsprune.settings import flag_name, is_nested, setting_types


@dataclass(frozen=True)
class MethodFlag:
    """One command-line flag that sets one field of one method's config."""

    config: type
    field: Field

    @property
    def option(self) -> str:
        return f"--{self.config.flag_prefix}{flag_name(self.field)}"

    @property
    def parameter(self) -> str:
        """The command function's keyword for the flag."""
        return self.option.removeprefix("--").replace("-", "_")

    @property
    def takes_method(self) -> bool:
        """A nested config (SDS's base), given as a method string."""
        return is_nested(self.field)

    def typer_parameter(self) -> inspect.Parameter:
        kind = str if self.takes_method else setting_types(self.config)[self.field.name][0]
        declaration = self.option
        if kind is bool:
            declaration += f"/--no-{self.option.removeprefix('--')}"
        info = typer.Option(declaration, help=self.field.metadata["help"])
        return inspect.Parameter(
            self.parameter,
            inspect.Parameter.KEYWORD_ONLY,
            default=self._default(),
            annotation=Annotated[kind | None, info],
        )

    def _default(self) -> object:
        """The field's default, for help to show (a nested config as its method string)."""
        if self.field.default_factory is not MISSING:
            return format_method(self.field.default_factory())
        return self.field.default


def method_flags(classes: Sequence[type] = CONFIG_CLASSES) -> list[MethodFlag]:
    """Every flag of the given config classes: their settings, and nested configs that have
    a flag (SDS's ``--base``)."""
    return [
        MethodFlag(cls, item)
        for cls in classes
        for item in fields(cls)
        if not is_nested(item) or item.metadata.get("flag")
    ]


def owl_switch() -> inspect.Parameter:
    """``--owl``: wrap the method in OWL (its settings are the ``--owl-*`` flags)."""
    info = typer.Option(f"--{OWL.name}", help=OWL.summary)
    return inspect.Parameter(
        OWL.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, info]
    )


def with_method_flags(
    classes: Sequence[type] = CONFIG_CLASSES, switch: bool = True
) -> Callable[[Callable], Callable]:
    """A decorator: the command takes one option per flag of ``classes`` (and ``--owl``
    with ``switch``), and its ``**method_settings`` receives those the command line gave."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        generated = [flag.typer_parameter() for flag in method_flags(classes)]
        generated += [owl_switch()] if switch else []
        names = [parameter.name for parameter in generated]

        @functools.wraps(command)
        def with_given_flags(context: typer.Context, **values):
            flags = {name: values.pop(name) for name in names}
            given = {k: v for k, v in flags.items() if _given(context, k)}
            return command(**values, **given)

        parameters = [_context_parameter()]
        for parameter in signature.parameters.values():
            is_settings = parameter.kind is inspect.Parameter.VAR_KEYWORD
            parameters += generated if is_settings else [parameter]
        with_given_flags.__signature__ = signature.replace(parameters=parameters)
        return with_given_flags

    return decorate


def _context_parameter() -> inspect.Parameter:
    """The click context typer passes in, which knows where each option's value came from."""
    return inspect.Parameter(
        "context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )


def _given(context: typer.Context, name: str) -> bool:
    """Whether the command line (or the environment) set the option, not its default."""
    return context.get_parameter_source(name).name != "DEFAULT"


def flag_presets(given: dict[str, object], classes: Sequence[type] = CONFIG_CLASSES) -> dict:
    """``{method name: {setting: value}}`` of the given flags of ``classes``' settings."""
    presets: dict[str, dict[str, object]] = {}
    for flag in method_flags(classes):
        if flag.parameter in given and not flag.takes_method:
            presets.setdefault(flag.config.name, {})[flag.field.name] = given[flag.parameter]
    return presets


def method_from_flags(method: str, given: dict[str, object]) -> Method:
    """The config ``--method`` and the given method flags describe together (a flag fills
    in what the method string leaves out)."""
    presets = flag_presets(given)
    base = given.get("base")
    if base is not None:
        presets.setdefault(SDS.name, {})["base"] = parse_method(str(base), presets)
    config = parse_method(method, presets)
    if given.get(OWL.name) and not isinstance(config, OWL):
        config = OWL(**presets.get(OWL.name, {}), inner=config)
    inner = config.inner if isinstance(config, OWL) else config
    if base is not None and not isinstance(inner, SDS):
        raise SdspruneError(f"--base applies to --method sds only (got --method {method})")
    return config
