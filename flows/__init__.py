"""Prefect flows that only compose the tasks: segment a volume, nightly inbox, train."""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar
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


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """One markdown artifact per key and flow run: a retried run replaces its own earlier
    version instead of adding a second one (other runs' versions stay in the history)."""
    from prefect import get_client
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if run_id:
        with get_client(sync_client=True) as client:
            old = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                )
            )
            for artifact in old:
                client.delete_artifact(artifact.id)
    create_markdown_artifact(markdown, key=key, description=description)
