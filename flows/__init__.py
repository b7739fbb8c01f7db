"""Prefect flows that only compose the tasks: segment a volume, nightly inbox, train."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, cast
from uuid import UUID

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Any)
R = TypeVar("R")

CORE_LOGGERS = ("unet_core", "tasks", "flows")


class OptionWords(logging.Filter):
    """Names the option fields in segflow's log messages (:func:`unet_core.errors.opt`) as
    the run form names them."""

    def __init__(self, name: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.name_field = name

    def filter(self, record: logging.LogRecord) -> bool:
        from unet_core.errors import render

        if isinstance(record.msg, str):
            record.msg = render(record.msg, self.name_field)
        return True


def core_logs_to_prefect(name: Callable[[str], str] | None = None) -> None:
    """Send segflow's own loggers to the Prefect run logs (what PREFECT_LOGGING_EXTRA_LOGGERS
    does, applied at run time so import order does not matter), options named by ``name``
    (the form's titles; default: the field in quotes)."""
    extra = logging.getLogger("prefect.extra")
    for logger_name in CORE_LOGGERS:
        logger = logging.getLogger(logger_name)
        if logger.level in (logging.NOTSET,) or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        for handler in extra.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
    for handler in extra.handlers:  # a handler's filter sees the records of child loggers
        for old in [f for f in handler.filters if isinstance(f, OptionWords)]:
            handler.removeFilter(old)
        handler.addFilter(OptionWords(name))
    for logger_name in RUN_LOGGERS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, OneTraceback) for f in logger.filters):
            logger.addFilter(OneTraceback())


#: Prefect's loggers of flow and task runs (the engine logs a run's exception on them).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
#: Set on an exception once a run's logs have named it.
_REPORTED = "_segflow_reported"


def expected_error(exc: BaseException) -> bool:
    """An error segflow raises on purpose about its input, parameters or storage (a
    :class:`unet_core.errors.SegflowError` not caused by something unforeseen): its one
    sentence says all; a traceback would only alarm."""
    from unet_core.errors import SegflowError

    if not isinstance(exc, SegflowError):
        return False
    cause = getattr(exc, "cause", None)
    return cause is None or isinstance(cause, SegflowError | OSError)


class OneTraceback(logging.Filter):
    """A run's logs name each exception once: an expected segflow error as its sentence (no
    traceback), any other with one traceback; Prefect's later records of the same exception
    (the engine logs a flow's exception again when it leaves) are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if getattr(exc, _REPORTED, False):
            return False
        if expected_error(exc):
            record.exc_info = None
            record.exc_text = None
        mark_reported(exc)
        return True


def mark_reported(exc: BaseException) -> None:
    """Note that the run's logs (or its final state's message) already name ``exc``."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _REPORTED, True)


def failed_state(exc: BaseException, message: str | None = None) -> Any:
    """The Failed state a flow returns for an expected failure: ``message`` (default: the
    error's sentence) as the state's message, no traceback in the logs, and the exception
    as its data (what ``state.result()`` raises, for Prefect and callers)."""
    from prefect.states import Failed

    mark_reported(exc)
    return Failed(message=message or str(exc) or type(exc).__name__, data=exc)


# ---------------------------------------------------------------- flat flow parameters

#: Name suffixes that carry a unit: ``retry_delay_s`` is titled "Retry delay (s)".
UNIT_SUFFIXES = {"s": "s", "mb": "MB", "gb": "GB", "px": "px"}
#: Words a title spells otherwise than a lowercase field name: "GPUs per worker".
TITLE_WORDS = {"gpus": "GPUs", "iou": "IoU", "cpus": "CPUs"}


def name_title(name: str) -> str:
    """A field name in words, with its unit: ``start_timeout_s`` -> "Start timeout (s)"."""
    words = name.split("_")
    unit = UNIT_SUFFIXES.get(words[-1]) if len(words) > 1 else None
    if unit:
        words.pop()
    words = [TITLE_WORDS.get(w, w) for w in words]
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} ({unit})" if unit else text


def field_title(name: str, field: FieldInfo) -> str:
    """The form title of a field: its own title, or its name in words with the unit."""
    return field.title or name_title(name)


def bounds_text(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """The allowed range in words: "from 1 to 256", "more than 0, at most 3600"."""

    def num(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else f"{v}"

    lows = "" if low is None else (f"more than {num(low)}" if low_open else f"at least {num(low)}")
    highs = (
        "" if high is None else (f"less than {num(high)}" if high_open else f"at most {num(high)}")
    )
    if low is not None and high is not None and not (low_open or high_open):
        return f"from {num(low)} to {num(high)}"
    return ", ".join(t for t in (lows, highs) if t)


def field_description(field: FieldInfo, examples: Sequence[Any] = ()) -> str:
    """The description as the UI shows it: no ``<...>`` (rendered as HTML and swallowed),
    with the field's bounds (a strict one said so: "more than 0") and an example."""
    text = re.sub(r"<([^<>]*)>", r"{\1}", field.description or "").strip()
    low = high = None
    low_open = high_open = False
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            low, low_open = m.ge, False
        if getattr(m, "gt", None) is not None:
            low, low_open = m.gt, True
        if getattr(m, "le", None) is not None:
            high, high_open = m.le, False
        if getattr(m, "lt", None) is not None:
            high, high_open = m.lt, True
    if low is not None or high is not None:
        text = f"{text} Allowed: {bounds_text(low, high, low_open, high_open)}.".strip()
    if examples and str(examples[0]) not in text:
        text = f"{text} Example: {example_text(examples[0])}".strip()
    return text


def example_text(value: Any) -> str:
    """An example as an operator types it into the form: text as it is (``64,256,256``),
    a list as JSON (``[0, 3]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def defined_in(model: type[BaseModel], name: str) -> type[BaseModel]:
    """The class of ``model``'s hierarchy that declares the field ``name``."""
    for base in model.__mro__:
        if name in vars(base).get("__annotations__", {}):
            return base
    return model


def form_order(
    model: type[BaseModel], first: Sequence[str], groups: Mapping[type[BaseModel], str]
) -> list[tuple[str, str | None]]:
    """The form's fields with their group: ``first`` ones (no group), then the rest by the
    order of ``groups`` (the class that declares a field), each group's in model order;
    a field of a class not in ``groups`` goes last, in the group "Advanced"."""
    order = list(groups)
    rest = [n for n in model.model_fields if n not in first]

    def rank(name: str) -> int:
        base = defined_in(model, name)
        return order.index(base) if base in order else len(order)

    ranked = sorted(rest, key=rank)  # stable: model order within a group
    return [(n, None) for n in first] + [
        (n, groups.get(defined_in(model, n), "Advanced")) for n in ranked
    ]


def flat_signature(
    model: type[BaseModel],
    first: Sequence[str] = (),
    examples: Mapping[str, list[Any]] | None = None,
    groups: Mapping[type[BaseModel], str] | None = None,
) -> inspect.Signature:
    """Keyword parameters made from a pydantic model's fields, ``first`` ones first, the
    others grouped by concept (``groups``: the class declaring a field -> its group's name,
    which leads the field's description), the advanced ones last.

    Prefect builds the run form and validates runs from a flow's signature, so each field
    becomes one top-level parameter with its type, bounds (``Annotated`` metadata), default,
    description and title; ``prefect deployment run --param NAME=VALUE`` sets one field.
    """
    names = form_order(model, first, groups or {})
    params = []
    for position, (name, group) in enumerate(names):
        field = model.model_fields[name]
        extra: dict[str, Any] = {"title": field_title(name, field), "position": position}
        shown = (examples or {}).get(name, field.examples)
        if shown:
            extra["examples"] = shown
        if field.default_factory is not None:
            default: Any = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        text = field_description(field, shown or ())
        if group:
            text = f"*{group}* · {text}"
        info = Field(default, description=text, json_schema_extra=extra)
        annotation: Any = field.annotation
        if field.metadata:
            annotation = Annotated[(annotation, *field.metadata)]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation
            )
        )
    return inspect.Signature(params, return_annotation=dict[str, Any])


def flat_parameters(
    model: type[M],
    first: Sequence[str] = (),
    examples: Mapping[str, list[Any]] | None = None,
    groups: Mapping[type[BaseModel], str] | None = None,
) -> Callable[[Callable[[M], R]], Callable[..., R]]:
    """Turn ``fn(params: Model)`` into ``fn(**fields)`` with a flat signature for Prefect."""

    def wrap(fn: Callable[[M], R]) -> Callable[..., R]:
        def flat(**values: Any) -> R:
            return fn(model(**values))

        flat.__name__ = fn.__name__
        flat.__qualname__ = fn.__qualname__
        flat.__module__ = fn.__module__
        flat.__doc__ = fn.__doc__
        flat.__signature__ = flat_signature(  # type: ignore[attr-defined]
            model, first, examples, groups
        )
        return flat

    return wrap


def form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A flow's parameter schema as the Prefect UI's run form shows it well.

    The UI renders a union (``anyOf``) as a type toggle ("str | None", with "Property is
    type None" under it) and starts every field at its schema default, so: an optional
    field is its one type without a default (left empty, it is omitted and the model's
    default, "automatic", applies); a union of one kind of value (a choice or an address)
    is a text field the model checks; a nested model's fields get titles in words ("GPUs
    per worker", "Start timeout (s)") and their bounds in the description, and its default
    leaves out the unset fields. Python-side validation is unchanged (the signature).
    """
    out = copy.deepcopy(schema)
    props = out.get("properties", {})
    for name in props:
        props[name] = _form_property(props[name])
    for definition in out.get("definitions", {}).values():
        fields = definition.get("properties", {})
        for name in fields:
            prop = _form_property(fields[name])
            if prop.get("title") in (None, name.replace("_", " ").title()):  # pydantic's own
                prop["title"] = name_title(name)
            if "Allowed:" not in prop.get("description", ""):
                allowed = bounds_text(
                    prop.get("minimum", prop.get("exclusiveMinimum")),
                    prop.get("maximum", prop.get("exclusiveMaximum")),
                    "exclusiveMinimum" in prop,
                    "exclusiveMaximum" in prop,
                )
                if allowed:
                    prop["description"] = f"{prop.get('description', '')} Allowed: {allowed}."
            fields[name] = prop
    out.pop("$defs", None)
    return out


def _form_property(prop: dict[str, Any]) -> dict[str, Any]:
    """One property of :func:`form_schema`."""
    prop = dict(prop)
    branches = prop.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        kinds = {b.get("type") for b in kept}
        if len(kept) == 1:
            prop = {**kept[0], **prop}
        elif len(kinds) == 1 and None not in kinds:
            prop = {"type": kinds.pop(), **prop}
        else:
            prop["anyOf"] = branches  # values of different kinds: the UI's toggle is right
    if "default" in prop and prop["default"] is None:
        del prop["default"]
    elif isinstance(prop.get("default"), dict):
        prop["default"] = {k: v for k, v in prop["default"].items() if v is not None}
    return prop


def run_form(flow: F) -> F:
    """Give a flow the parameter schema of :func:`form_schema` (its run form)."""
    from prefect.utilities.callables import ParameterSchema

    flow.parameters = ParameterSchema(**form_schema(flow.parameters.model_dump()))
    return flow


def in_form_words(exc: BaseException, name: Callable[[str], str]) -> BaseException:
    """A segflow error whose option fields (:func:`unet_core.errors.opt`) are named as the
    run form names them (``name``), for the flow run's state message; others unchanged."""
    from unet_core.errors import SegflowError

    if not isinstance(exc, SegflowError):
        return exc
    text = exc.render(name)
    shown = copy.copy(exc)
    shown.template = text
    shown.args = (text, *exc.args[1:])
    return shown


# ------------------------------------------------------------------ run identity helpers

#: Environment variable holding the facility's time zone (an IANA name): ``segflow serve``
#: sets it from its ``--timezone`` for the runs it serves (run names, times in reports).
ZONE_ENV = "SEGFLOW_TIMEZONE"

#: The names the Prefect UI's run form pre-fills (``FlowRunNameInput``: a Greek letter,
#: perhaps numbered, a star or constellation and sometimes a letter or a word:
#: ``iota12-praxis-manifold``, ``psi-pauling-g``).
UI_GENERATED_NAME = re.compile(
    r"(alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi"
    r"|rho|sigma|tau|upsilon|phi|chi|psi|omega)[0-9]*(-[a-z-]*)?"
)


def facility_time(when: datetime | None = None) -> datetime:
    """``when`` (default: now) in the facility's time zone (:data:`ZONE_ENV`; where it is
    unset or unknown, this machine's)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    name = os.environ.get(ZONE_ENV, "").strip()
    try:
        zone = ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    return when.astimezone(zone)


def _prefect_slug(name: str) -> bool:
    """Whether ``name`` is one of the Prefect server's own names: two random words from
    coolname (``brave-falcon``), which it gives a run created without a name."""
    import coolname

    try:  # coolname's two-word pattern: a cartesian product of two word lists
        lists = coolname._default._lists[2]._lists[0]._lists  # type: ignore[attr-defined]
        words = [set(w) for w in lists]
    except (AttributeError, IndexError, KeyError, TypeError):  # another coolname layout
        return re.fullmatch(r"[a-z]+-[a-z]+", name) is not None
    parts = name.split("-")
    return len(parts) == len(words) and all(p in w for p, w in zip(parts, words, strict=True))


def is_generated_name(name: str) -> bool:
    """Whether a run's name was made up (by the UI's form or the Prefect server) rather
    than chosen: such names are replaced by the volume and the time."""
    return not name or UI_GENERATED_NAME.fullmatch(name) is not None or _prefect_slug(name)


def volume_run_name(current: str, volume: str, when: datetime | None = None) -> str:
    """A run's name: ``current`` where someone chose it, else the volume and the
    facility's local time (``brain-01-261130-171300``)."""
    if not is_generated_name(current):
        return current
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", volume)[:60]
    return f"{slug}-{facility_time(when):%y%m%d-%H%M%S}"


def add_run_tags(*tags: str) -> None:
    """Add tags to the current flow run (the UI filters runs by them)."""
    from prefect import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        return
    wanted = [t[:100] for t in tags if t]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        merged = list(dict.fromkeys([*run.tags, *wanted]))
        if merged != list(run.tags):
            client.update_flow_run(run_id, tags=merged)


#: Task-run states an attempt leaves behind when its process dies mid-run.
UNFINISHED = ("RUNNING", "PENDING", "SCHEDULED")


def crash_earlier_attempts() -> int:
    """Mark Crashed the task runs that earlier attempts of the current flow run left
    unfinished (their process died: without this they show Running forever beside the
    retry's own). Returns how many; a first attempt has none."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    run_id, attempt = flow_run.id, int(flow_run.run_count or 1)
    if not run_id or attempt <= 1:
        return 0
    unfinished = TaskRunFilter(
        state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=[StateType(s) for s in UNFINISHED])
        )
    )
    marked = 0
    with get_client(sync_client=True) as client:
        while True:
            left = [
                t
                for t in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(run_id))])),
                    task_run_filter=unfinished,
                    limit=200,
                )
                if t.flow_run_run_count < attempt
            ]
            if not left:
                return marked
            for t in left:
                client.set_task_run_state(
                    t.id,
                    Crashed(
                        message=f"attempt {t.flow_run_run_count} of this flow run ended "
                        f"without finishing it (its process died); attempt {attempt} "
                        "computes what it left unfinished"
                    ),
                    force=True,
                )
            marked += len(left)


def run_artifacts(key: str | None = None, kind: str | None = None) -> list[Any]:
    """This flow run's artifacts (none outside a run), of ``key`` and/or type ``kind``."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        ArtifactFilterType,
    )
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if not run_id:
        return []
    wanted = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
        key=ArtifactFilterKey(any_=[key]) if key else None,
        type=ArtifactFilterType(any_=[kind]) if kind else None,
    )
    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=wanted))


def publish_markdown(key: str, markdown: str, description: str, replace: bool = True) -> None:
    """A markdown artifact of the current flow run. ``replace``: one per key and run, a
    retried run replaces its own earlier version instead of adding a second one (other
    runs' versions stay in the history); otherwise every attempt's version is kept (a
    failure's record survives the retry that succeeds)."""
    from prefect import get_client
    from prefect.artifacts import create_markdown_artifact

    old = run_artifacts(key) if replace else []
    if old:
        with get_client(sync_client=True) as client:
            for artifact in old:
                client.delete_artifact(artifact.id)
    create_markdown_artifact(markdown, key=key, description=description)


class RunProgress:
    """The one progress artifact of a flow run: its card says the value ("40% of regions
    done: 2 of 5"), and a retried run updates the card of its first attempt instead of
    adding a second. At most one API call per ``every_s`` seconds (a 2,000-region run
    would otherwise make 2,000), except the last."""

    def __init__(self, key: str, what: str, total: int, every_s: float = 1.0) -> None:
        from prefect.artifacts import create_progress_artifact

        self.what, self.total, self.every_s = what, max(total, 1), every_s
        self.shown_at = time.monotonic()
        old = run_artifacts(key, "progress")
        self.id = old[0].id if old else None
        if self.id is None:
            self.id = cast(UUID, create_progress_artifact(0.0, key=key, description=self.text(0)))

    def text(self, done: int) -> str:
        return f"**{100.0 * done / self.total:.0f}%** {self.what} done: {done:,} of {self.total:,}"

    def show(self, done: int, last: bool = False) -> None:
        """Show ``done`` of the total (throttled, unless ``last``)."""
        from prefect.artifacts import update_progress_artifact

        if self.id is None or not (last or time.monotonic() - self.shown_at >= self.every_s):
            return
        update_progress_artifact(self.id, 100.0 * done / self.total, description=self.text(done))
        self.shown_at = time.monotonic()
