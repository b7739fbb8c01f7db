"""CLI options generated from the pydantic models the flows take as parameters.

One field, one option, mechanically: ``lease_wait_s`` is ``--lease-wait-s`` (:func:`flag`),
with the field's default, choices (``Literal``), bounds (``ge``/``le``), and description as
its help; a bool is ``--name/--no-name``; a tuple of numbers is one text option
(``--chunks 64,128,128``). :func:`with_models` adds the options of one or more models to a
command and hands it the validated models, so the CLI and the flows cannot disagree on a
name, a default or a bound (tests/flows/test_params.py compares them field by field).
A field may also have short aliases (``-m``) or extra flags that set it
(``--fast`` for ``mode=fast``) through :class:`Extra`.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tasks.cluster import ClusterSpec
from tasks.options import GROUPS, PipelineOptions
from unet_core.errors import ConfigError, render

R = TypeVar("R")

#: Fields whose flag is not the mechanical one (the field ``kind`` of a cluster is where
#: the workers run: ``--cluster``).
FLAG_NAMES = {"kind": "--cluster"}


def parse_shape(text: str | None, what: str = "shape") -> tuple[int, ...] | None:
    """'64,128,128' -> (64, 128, 128); None stays None."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def _with_options(
    fn: Callable[..., R],
    options: list[inspect.Parameter],
    call: Callable[[Callable[..., R], Any, dict[str, Any]], R],
    replaces: str | None = None,
) -> Callable[..., R]:
    """``fn`` with ``options`` added to the signature typer reads (in place of its
    parameter ``replaces``); ``call(fn, args, kwargs)`` takes them out and calls ``fn``."""
    own = [
        p.replace(annotation=_evaluate(p.annotation, fn))
        for p in inspect.signature(fn).parameters.values()
        if p.name != replaces
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        return call(fn, args, kwargs)

    params = [*own, *options]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _evaluate(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) as its object."""
    if isinstance(annotation, str):
        return eval(annotation, fn.__globals__)  # what inspect.signature(eval_str=True) does
    return annotation


def flag(name: str) -> str:
    """The CLI flag of a field: ``lease_wait_s`` -> ``--lease-wait-s``."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def name_field(name: str) -> str:
    """How a CLI message names a field (:func:`unet_core.errors.opt`): its flag."""
    return flag(name)


@dataclass(frozen=True)
class Extra:
    """What a command adds to a generated option: aliases (``-m``), a hidden field, or
    flags that set the field to a value (``{"--fast": "fast"}``)."""

    aliases: tuple[str, ...] = ()
    envvar: str | None = None
    sets: Mapping[str, Any] = field(default_factory=dict)
    help_sets: Mapping[str, str] = field(default_factory=dict)
    hidden: bool = False


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return annotation, type(None) in get_args(annotation)
    return annotation, False


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in info.metadata:
        for attr, key in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            value = getattr(m, attr, None)
            if value is not None:  # a strict bound (gt, lt) is the model's to refuse
                out[key] = value
    return out


def choices(info: FieldInfo) -> tuple[Any, ...] | None:
    """The values a field allows (a ``Literal``), or None."""
    inner, _ = _strip_optional(info.annotation)
    if get_origin(inner) is Literal:
        return tuple(get_args(inner))
    return None


def default_of(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def _is_tuple(inner: Any) -> type | None:
    """The item type of ``tuple[X, ...]``/``list[X]`` (None for anything else), also
    inside ``Annotated`` (:data:`tasks.options.Shape`)."""
    if get_origin(inner) is Annotated:
        inner = get_args(inner)[0]
    if get_origin(inner) in (tuple, list):
        args = [a for a in get_args(inner) if a is not Ellipsis]
        if args and all(a is args[0] for a in args) and args[0] in (int, float):
            return typing.cast(type, args[0])
    return None


def _help(info: FieldInfo) -> str:
    return render(info.description or "", name_field)


def option_parameter(
    name: str, info: FieldInfo, extra: Extra | None = None, panel: str | None = None
) -> inspect.Parameter:
    """The typer option of one model field, as a keyword parameter."""
    extra = extra or Extra()
    inner, optional = _strip_optional(info.annotation)
    default = default_of(info)
    kw: dict[str, Any] = {"help": _help(info), "rich_help_panel": panel, "hidden": extra.hidden}
    if extra.envvar:
        kw["envvar"] = extra.envvar
    decls: list[str] = [flag(name), *extra.aliases]
    kind: Any
    allowed = choices(info)
    item = _is_tuple(inner)
    if inner is bool:
        kind = bool
        if default:  # on by default: the flag turns it off
            decls = [f"{flag(name)}/--no-{flag(name)[2:]}", *extra.aliases]
    elif allowed is not None:
        kind = Literal[allowed] | None if optional else Literal[allowed]
    elif item is not None:
        kind = str | None
        example = "64,128,128" if item is int else "2.0,0.5,0.5"
        kw["help"] = f"{kw['help']} Comma-separated, e.g. {example}."
        kw["metavar"] = "N,N,N" if item is int else "X,X,X"
        default = None if default is None else ",".join(map(str, default))
    elif inner in (int, float, str):
        kind = inner | None if optional else inner
        kw.update(_bounds(info))
    else:  # a type without a CLI spelling: text, validated by the model
        kind = str | None
        default = None if default is None else str(default)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(*decls, **kw)],
    )


def _parse_tuple(name: str, text: str, item: type) -> tuple[Any, ...]:
    try:
        values = tuple(item(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"{flag(name)} must be {'integers' if item is int else 'numbers'} separated by "
            f"commas, got {text!r}"
        ) from None
    if not values:
        raise ConfigError(f"{flag(name)} is empty")
    if item is float and not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag(name)} must hold finite numbers, got {text!r}")
    return values


def validate(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """``model(**values)``; the first problem as one :class:`ConfigError` naming the flag."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation(exc)) from None


def describe_validation(exc: ValidationError, name: Callable[[str], str] = name_field) -> str:
    """The first problem of a pydantic validation error, naming the field with ``name``."""
    first = exc.errors()[0]
    # field names only (a union's member tags such as "literal['a','b']" are not fields)
    loc = [str(p) for p in first.get("loc", ()) if isinstance(p, str) and p.isidentifier()]
    msg = str(first.get("msg", exc)).removeprefix("Value error, ")
    value = first.get("input")
    if not loc:
        return render(msg, name)
    shown = "" if isinstance(value, dict | BaseModel) or value is None else f" {value!r}"
    sep = " " if msg.startswith("is ") else ": "
    return f"{name(loc[-1])}{shown}{sep}{render(msg, name)}"


def _panel(name: str, model: type[BaseModel], panels: Mapping[type[BaseModel], str]) -> str | None:
    """The help panel of a field: that of the (base) model that defines it."""
    for base in model.__mro__:
        if base in panels and name in getattr(base, "model_fields", {}):
            return panels[base]
    return None


def model_parameters(
    models: Sequence[type[BaseModel]],
    exclude: Sequence[str] = (),
    extras: Mapping[str, Extra] | None = None,
    panels: Mapping[type[BaseModel], str] | None = None,
) -> list[inspect.Parameter]:
    """The options of every field of ``models`` (each field once, in model order)."""
    params: list[inspect.Parameter] = []
    seen = set(exclude)
    for model in models:
        for name, info in model.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            extra = (extras or {}).get(name)
            panel = _panel(name, model, panels or {})
            params.append(option_parameter(name, info, extra, panel))
            for decl, _value in (extra.sets if extra else {}).items():
                help_text = (extra.help_sets if extra else {}).get(decl, "")
                params.append(
                    inspect.Parameter(
                        f"_set_{decl.strip('-').replace('-', '_')}",
                        inspect.Parameter.KEYWORD_ONLY,
                        default=False,
                        annotation=Annotated[
                            bool,
                            typer.Option(decl, help=help_text, rich_help_panel=panel),
                        ],
                    )
                )
    return params


def collect(
    model: type[BaseModel],
    kwargs: dict[str, Any],
    extras: Mapping[str, Extra] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> Any:
    """Take ``model``'s option values out of ``kwargs`` and validate them into a model."""
    values: dict[str, Any] = dict(fixed or {})
    for name, info in model.model_fields.items():
        if name in values or name not in kwargs:
            continue
        value = kwargs.pop(name)
        inner, _ = _strip_optional(info.annotation)
        item = _is_tuple(inner)
        if item is not None and isinstance(value, str):
            value = _parse_tuple(name, value, item)
        extra = (extras or {}).get(name)
        for decl, setting in (extra.sets if extra else {}).items():
            key = f"_set_{decl.strip('-').replace('-', '_')}"
            if kwargs.pop(key, False):
                if value != default_of(info) and value != setting:
                    raise typer.BadParameter(f"{decl} and {flag(name)} {value} exclude each other")
                value = setting
        values[name] = value
    return validate(model, values)


def with_models(
    *models: tuple[str, type[BaseModel]],
    exclude: Sequence[str] = (),
    extras: Mapping[str, Extra] | None = None,
    panels: Mapping[type[BaseModel], str] | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command the options of each ``(parameter, Model)``: the command's parameter
    of that name receives the validated model. ``exclude``: fields left out (the model's
    default then applies)."""

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:

        all_models = [m for _, m in models]
        options = model_parameters(all_models, exclude, extras, panels)
        replaced = {p for p, _ in models}

        def call(fn: Callable[..., R], args: Any, kwargs: dict[str, Any]) -> R:
            built: dict[str, Any] = {}
            for param, model in models:
                built[param] = collect(model, kwargs, extras)
            for key in [k for k in kwargs if k.startswith("_set_")]:
                kwargs.pop(key)
            return fn(*args, **built, **kwargs)

        wrapped = _with_options(fn, options, call, replaces=None)
        sig = inspect.signature(wrapped)
        kept = [p for p in sig.parameters.values() if p.name not in replaced]
        wrapped.__signature__ = sig.replace(parameters=kept)  # type: ignore[attr-defined]
        wrapped.__annotations__ = {p.name: p.annotation for p in kept}
        return wrapped

    return decorate


# ------------------------------------------------- what the run commands share

#: Help panels of the generated options: the concepts of the run form's groups.
PANELS: dict[type[BaseModel], str] = GROUPS

#: What the segment and predict commands add to the generated options: short flags and
#: old spellings, and --fast/--reference as shorthands of --mode.
EXTRAS = {
    "mode": Extra(
        sets={"--fast": "fast", "--reference": "reference"},
        help_sets={
            "--fast": "Same as --mode fast: tiles planned per block, fewest voxels; the last "
            "bits of the result depend on the chunking.",
            "--reference": "Same as --mode reference: bitwise equal to one pass over the "
            "whole volume (PyTorch's own CPU kernels; several times slower).",
        },
    ),
    "lease_wait_s": Extra(aliases=("--lease-wait",)),
    "kind": Extra(aliases=("--dask-address",)),
    "queue": Extra(aliases=("--partition",)),
    "start_timeout_s": Extra(aliases=("--start-timeout",)),
}

#: The models a run's options come from, in the order ``-h`` lists them.
RUN_MODELS = (("options", PipelineOptions), ("cluster", ClusterSpec))


__all__ = [
    "Extra",
    "choices",
    "collect",
    "default_of",
    "describe_validation",
    "flag",
    "model_parameters",
    "name_field",
    "option_parameter",
    "validate",
    "with_models",
]
