"""The `tune` and `tune resume` options, generated from TuneSettings' fields (their
names, types, defaults and help live there, once)."""


from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from aevyra_forge.core.settings import AMENDABLE_SETTINGS, TuneSettings, cli_of


def settings_as_options(command: Callable[..., None]) -> Callable[..., None]:
    """Put one `tune` option per setting (TuneSettings' fields with an option) where
    `command` takes **options; typer reads the parameters from `__signature__`."""
    return _with_options(command, [
        _option(name, field) for name, field in TuneSettings.model_fields.items()
        if cli_of(field).option])


def amendments_as_options(command: Callable[..., None]) -> Callable[..., None]:
    """Put one `tune resume` option per setting resume may amend (the agent, the budgets),
    each defaulting to None: "keep the run's value"."""
    return _with_options(command, [
        _option(name, TuneSettings.model_fields[name], amend=True)
        for name in AMENDABLE_SETTINGS])


def _with_options(command: Callable[..., None], generated: list[inspect.Parameter]
                  ) -> Callable[..., None]:
    signature = inspect.signature(command, eval_str=True)
    first, *own = (p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD)
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[first, *generated, *own])
    return command


def _option(name: str, field: FieldInfo, amend: bool = False) -> inspect.Parameter:
    """A setting's option: type (None stripped; a path setting parses as a Path, a Literal
    shows its values), default and help from the field. A required setting defaults to
    None here so that `tune resume` never needs it; `tune` names it when it is missing.
    An amendment (`amend`) defaults to None, keeping the run's value."""
    cli = cli_of(field)
    kind: Any = field.annotation
    if get_origin(kind) in (Union, UnionType):
        (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
    choices = get_args(kind) if get_origin(kind) is Literal else ()
    kind = Path if cli.path else type(choices[0]) if choices else kind
    default = None if field.is_required() or amend else field.default
    info = typer.Option(*[flag(name)] if kind is bool and not default else [],
                        help=(field.description or "") + (" Default: the run's." if amend else ""),
                        envvar=cli.envvar,
                        metavar="|".join(map(str, choices)) or None)
    # typer reads the type from the annotation, built here at run time
    annotation = cast(Any, Annotated)[kind if default is not None else kind | None, info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


