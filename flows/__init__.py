"""Prefect flows that only compose the tasks: segment a volume, nightly inbox, train."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast
from uuid import UUID

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)
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


def field_title(name: str, field: FieldInfo) -> str:
    """The form title of a field: its own title, or its name in words with the unit."""
    if field.title:
        return field.title
    words = name.split("_")
    unit = UNIT_SUFFIXES.get(words[-1]) if len(words) > 1 else None
    if unit:
        words.pop()
    text = " ".join(words).capitalize()
    return f"{text} ({unit})" if unit else text


def field_description(field: FieldInfo) -> str:
    """The description as the UI shows it: no ``<...>`` (rendered as HTML and swallowed),
    with the field's bounds stated."""
    text = re.sub(r"<([^<>]*)>", r"{\1}", field.description or "").strip()
    low = high = None
    for m in field.metadata:
        low = getattr(m, "ge", getattr(m, "gt", low))
        high = getattr(m, "le", getattr(m, "lt", high))
    if low is not None or high is not None:
        lo = "" if low is None else f"{low:g}" if isinstance(low, float) else f"{low}"
        hi = "" if high is None else f"{high:g}" if isinstance(high, float) else f"{high}"
        bounds = f"from {lo} to {hi}" if lo and hi else f"at least {lo}" if lo else f"at most {hi}"
        text = f"{text} Allowed: {bounds}.".strip()
    return text


def flat_signature(
    model: type[BaseModel],
    first: Sequence[str] = (),
    examples: Mapping[str, list[Any]] | None = None,
) -> inspect.Signature:
    """Keyword parameters made from a pydantic model's fields, ``first`` ones first.

    Prefect builds the run form and validates runs from a flow's signature, so each field
    becomes one top-level parameter with its type, bounds (``Annotated`` metadata), default,
    description and title; ``prefect deployment run --param NAME=VALUE`` sets one field.
    """
    names = list(first) + [n for n in model.model_fields if n not in first]
    params = []
    for position, name in enumerate(names):
        field = model.model_fields[name]
        extra: dict[str, Any] = {"title": field_title(name, field), "position": position}
        shown = (examples or {}).get(name, field.examples)
        if shown:
            extra["examples"] = shown
        if field.default_factory is not None:
            default: Any = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        info = Field(default, description=field_description(field), json_schema_extra=extra)
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
    model: type[M], first: Sequence[str] = (), examples: Mapping[str, list[Any]] | None = None
) -> Callable[[Callable[[M], R]], Callable[..., R]]:
    """Turn ``fn(params: Model)`` into ``fn(**fields)`` with a flat signature for Prefect."""

    def wrap(fn: Callable[[M], R]) -> Callable[..., R]:
        def flat(**values: Any) -> R:
            return fn(model(**values))

        flat.__name__ = fn.__name__
        flat.__qualname__ = fn.__qualname__
        flat.__module__ = fn.__module__
        flat.__doc__ = fn.__doc__
        flat.__signature__ = flat_signature(model, first, examples)  # type: ignore[attr-defined]
        return flat

    return wrap


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
