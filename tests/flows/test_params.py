"""One parameter schema per concept: the CLI's options and the flows' parameters are made
from the same pydantic models, so every shared field has the same name (mechanically
mapped, ``lease_wait_s`` <-> ``--lease-wait-s``), default, choices and bounds in both."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import pytest
import typer.main

from deployments.serve import ServeSettings
from flows.nightly import NightlyParams, nightly_inbox
from flows.segment import SegmentOptions, SegmentVolumeParams, segment_volume
from flows.train import train_model
from segflow.cli import _register, app
from segflow.options import choices, default_of, flag
from tasks.cluster import ClusterSpec
from tasks.options import PipelineOptions, SegmentParams


def cli_command(path: str) -> Any:
    _register()
    group: Any = typer.main.get_command(app)
    for part in path.split():
        group = group.commands[part]
    return group


def cli_options(path: str) -> dict[str, Any]:
    """Every option of a command by each of its flags."""
    found: dict[str, Any] = {}
    for p in cli_command(path).params:
        if getattr(p, "param_type_name", "") == "option":
            for decl in (*p.opts, *p.secondary_opts):
                found[decl] = p
    return found


def _schema_leaf(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return {**branch, **{k: v for k, v in prop.items() if k != "anyOf"}}
    return prop


def _cli_choices(option: Any) -> tuple[Any, ...]:
    """The values a CLI option accepts (its ``Literal`` annotation), or ()."""
    annotation = option.type_descriptor.annotation
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def _cli_default(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return value


def _bounds(info: Any) -> tuple[Any, Any]:
    low = high = None
    for m in info.metadata:
        low = getattr(m, "ge", getattr(m, "gt", low))
        high = getattr(m, "le", getattr(m, "lt", high))
    return low, high


def compare_cli(path: str, model: type, exclude: set[str] = frozenset()) -> list[str]:
    """Every field of ``model`` against the command's option of the same (mapped) name."""
    options = cli_options(path)
    problems = []
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        option = options.get(flag(name))
        if option is None:
            problems.append(f"{path}: no option {flag(name)} for the field {name}")
            continue
        if option.default != _cli_default(default_of(info)):
            problems.append(
                f"{path} {flag(name)}: default {option.default!r} != {default_of(info)!r}"
            )
        allowed = choices(info)
        got = _cli_choices(option)
        if allowed is not None and tuple(map(str, allowed)) != tuple(map(str, got)):
            problems.append(f"{path} {flag(name)}: choices {got} != {allowed}")
        low, high = _bounds(info)
        if (low, high) != (option.min, option.max):
            problems.append(
                f"{path} {flag(name)}: bounds [{option.min}, {option.max}] != [{low}, {high}]"
            )
        if not option.help or (info.description or "")[:30].split("(")[0] not in option.help:
            problems.append(f"{path} {flag(name)}: help is not the field's description")
    return problems


def compare_flow(flow: Any, model: type, nested: str | None = None) -> list[str]:
    """Every field of ``model`` against the flow's parameter schema (``nested``: the
    fields sit inside that parameter, e.g. the cluster)."""
    schema = flow.parameters.model_dump()
    props = schema["properties"]
    if nested is not None:
        ref = _schema_leaf(props[nested])["$ref"].rsplit("/", 1)[-1]
        props = schema["definitions"][ref]["properties"]
    problems = []
    for name, info in model.model_fields.items():
        prop = props.get(name)
        if prop is None:
            problems.append(f"{flow.name}: no parameter {name}")
            continue
        leaf = _schema_leaf(prop)
        default = default_of(info)
        if isinstance(default, tuple):
            default = list(default)
        if prop.get("default", default) != default:
            problems.append(f"{flow.name} {name}: default {prop.get('default')!r} != {default!r}")
        allowed = choices(info)
        if allowed is not None and tuple(leaf.get("enum", ())) != allowed:
            problems.append(f"{flow.name} {name}: choices {leaf.get('enum')} != {allowed}")
        low, high = _bounds(info)
        got_low = leaf.get("minimum", leaf.get("exclusiveMinimum"))
        got_high = leaf.get("maximum", leaf.get("exclusiveMaximum"))
        if (got_low, got_high) != (low, high):
            problems.append(
                f"{flow.name} {name}: bounds [{got_low}, {got_high}] != [{low}, {high}]"
            )
    return problems


@pytest.mark.parametrize("command", ["segment", "predict"])
def test_run_commands_have_every_pipeline_field_as_the_flows_do(command):
    problems = compare_cli(command, PipelineOptions) + compare_cli(command, ClusterSpec)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flow", [segment_volume, nightly_inbox])
def test_flows_take_every_pipeline_field_with_the_same_default_and_bounds(flow):
    problems = compare_flow(flow, PipelineOptions) + compare_flow(flow, ClusterSpec, "cluster")
    assert not problems, "\n".join(problems)


def test_every_shared_field_is_the_same_in_the_cli_and_the_flows():
    """The defaults the doors declare are the model's: e.g. instances (was True in the flow
    and False in the CLI), lease_wait_s (was --lease-wait), settle_s (was --settle)."""
    segment = cli_options("segment")
    props = segment_volume.parameters.model_dump()["properties"]
    for name in PipelineOptions.model_fields:
        assert segment[flag(name)].default == _cli_default(props[name].get("default")), name
    serve = cli_options("serve")
    nightly = nightly_inbox.parameters.model_dump()["properties"]
    shared = set(ServeSettings.model_fields) & set(NightlyParams.model_fields)
    assert {"settle_s", "inbox", "output", "model"} <= shared
    for name in shared - {"cluster"}:
        assert flag(name) in serve, f"serve lacks {flag(name)}"
        if name in ("inbox", "output", "model", "cluster"):
            continue  # required by the flow, optional for serve; the cluster's fields above
        assert serve[flag(name)].default == nightly[name].get("default"), name


def test_engine_parameters_reach_the_flows_unchanged():
    assert set(SegmentParams.model_fields) <= set(SegmentOptions.model_fields)
    options = SegmentOptions(channel=1, probabilities_dtype="float32", tile=(1, 64, 64))
    assert options.pipeline_options().engine() == SegmentParams(
        channel=1, probabilities_dtype="float32", tile=(1, 64, 64)
    )


def test_where_dask_runs_is_one_field():
    """One place says where Dask runs: the cluster (an address is a kind of cluster)."""
    for model in (SegmentVolumeParams, NightlyParams):
        assert "dask_address" not in model.model_fields
    spec = SegmentVolumeParams(source="a.tif", model="m", cluster={"kind": "10.0.0.1:8786"})
    assert spec.cluster.kind == "tcp://10.0.0.1:8786"


def test_flow_forms_are_flat_ordered_titled_and_bounded():
    seg = segment_volume.parameters.model_dump()
    props = seg["properties"]
    assert list(props)[:3] == ["source", "model", "output"]
    assert seg["required"] == ["source", "model"]
    assert [props[n]["position"] for n in list(props)[:3]] == [0, 1, 2]
    assert props["retry_delay_s"]["title"] == "Retry delay (s)"
    assert props["region_timeout_s"]["title"] == "Region timeout (s)"
    assert props["batch_size"]["minimum"] == 1
    assert props["batch_size"]["maximum"] == 256
    assert "from 1 to 256" in props["batch_size"]["description"]
    assert props["chunks"]["examples"]
    assert props["tile"]["examples"]
    for name, prop in props.items():
        assert prop.get("description"), name
        assert "<" not in prop["description"], (name, prop["description"])
    nightly = nightly_inbox.parameters.model_dump()
    assert list(nightly["properties"])[:4] == ["inbox", "output", "model", "settle_s"]
    assert nightly["properties"]["settle_s"]["title"] == "Settle time (s)"
    train = train_model.parameters.model_dump()
    assert list(train["properties"])[:3] == ["images", "labels", "out"]


def test_flat_parameters_are_validated_like_the_model():
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="batch_size"):
        segment_volume.validate_parameters({"source": "a.tif", "model": "m", "batch_size": 0})
    ok = segment_volume.validate_parameters({"source": "a.tif", "model": "m", "batch_size": 2})
    assert ok["batch_size"] == 2


def _schemas() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f.name, f.parameters.model_dump()) for f in (segment_volume, nightly_inbox, train_model)
    ]


def _properties(schema: dict[str, Any]):
    yield from schema["properties"].items()
    for definition in schema.get("definitions", {}).values():
        yield from definition.get("properties", {}).items()


@pytest.mark.parametrize(("flow", "schema"), _schemas())
def test_the_run_form_has_no_union_toggles_and_no_null_defaults(flow, schema):
    """The UI shows a union as a "str | None" toggle over "Property is type None" and
    submits a null default: an optional field is its one type, left empty (omitted)."""
    for name, prop in _properties(schema):
        assert "anyOf" not in prop, (flow, name, prop)
        assert "default" not in prop or prop["default"] is not None, (flow, name)
        assert (
            None not in (prop.get("default") or {}).values()
            if isinstance(prop.get("default"), dict)
            else True
        ), (flow, name, prop["default"])
        assert prop.get("title"), (flow, name)
        assert "_" not in prop["title"], (flow, name, prop["title"])


def test_the_run_form_says_titles_examples_and_bounds_as_an_operator_reads_them():
    schema = segment_volume.parameters.model_dump()
    props = schema["properties"]
    cluster = schema["definitions"]["ClusterSpec"]["properties"]
    assert cluster["gpus_per_worker"]["title"] == "GPUs per worker"
    assert cluster["start_timeout_s"]["title"] == "Start timeout (s)"
    assert "more than 0" in cluster["start_timeout_s"]["description"]
    assert props["link_iou"]["title"] == "Link IoU"
    # 0 is refused: the form must not say "from 0"
    assert "from 0" not in props["region_timeout_s"]["description"]
    assert "more than 0, at most 604800" in props["region_timeout_s"]["description"]
    for name in ("chunks", "tile", "voxel_size"):  # one text field, its example shown
        assert props[name]["type"] == "string", name
        assert "Example: " in props[name]["description"], name
    assert "Example: 64,256,256" in props["chunks"]["description"]
    # what to segment and the everyday choices first, the rest grouped by concept
    names = list(props)
    assert names[:8] == [
        "source",
        "model",
        "output",
        "instances",
        "device",
        "batch_size",
        "chunks",
        "tile",
    ]
    assert [props[n]["position"] for n in names] == list(range(len(names)))
    groups = [props[n]["description"].split("*")[1] for n in names[8:]]
    assert groups == sorted(groups, key=groups.index), "a group's fields are together"
    assert groups[-1] == "Where and how regions run"


def test_a_shape_typed_as_text_is_the_same_as_a_list():
    values = {"source": "a.tif", "model": "m"}
    typed = segment_volume.validate_parameters({**values, "chunks": "64, 256,256"})
    listed = segment_volume.validate_parameters({**values, "chunks": [64, 256, 256]})
    assert typed["chunks"] == listed["chunks"] == (64, 256, 256)
    assert SegmentVolumeParams(**values, voxel_size="2,0.5,0.5").voxel_size == (2.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="2 or 3 numbers"):
        SegmentVolumeParams(**values, voxel_size="1")


def test_what_the_ui_form_submits_passes_the_servers_schema_check():
    """The server checks a run's parameters against the schema (enforce_parameter_schema,
    with Prefect's own check): what the form sends (defaults, the cluster's default object,
    a shape as text) and an empty optional field (omitted or null) are accepted."""
    from prefect.utilities.schema_tools.validation import validate

    schema = segment_volume.parameters.model_dump()
    defaults = {n: p["default"] for n, p in schema["properties"].items() if "default" in p}
    form = {**defaults, "source": "/d/a.tif", "model": "/m.ckpt", "tile": "1,60,60"}
    assert form["cluster"] == {"kind": "local", "gpus_per_worker": 0, "start_timeout_s": 600.0}
    validate(form, schema, raise_on_error=True)
    validate({**form, "output": None, "chunks": None}, schema, raise_on_error=True)
    segment_volume.validate_parameters(form)


@pytest.mark.parametrize(
    "name",
    # names the Prefect UI's run form pre-filled (FlowRunNameInput), seen in a browser
    [
        "iota12-praxis-manifold",
        "psi-pauling-g",
        "zeta81-garenor-tensor",
        "tau787-arret",
        "omega6-galton",
        "beta68-oxkintok-cluster",
        "gamma3-invernia",
        "theta-dakala",
    ],
)
def test_a_name_the_ui_made_up_becomes_the_volume_and_the_facility_time(name, monkeypatch):
    from datetime import UTC, datetime

    from flows import ZONE_ENV, is_generated_name, volume_run_name

    monkeypatch.setenv(ZONE_ENV, "Europe/Berlin")
    assert is_generated_name(name)
    when = datetime(2026, 11, 30, 16, 13, 0, tzinfo=UTC)  # 17:13 in Berlin
    assert volume_run_name(name, "brain-01", when) == "brain-01-261130-171300"


def test_prefect_server_names_are_replaced_and_typed_names_kept():
    import coolname
    from prefect.utilities.names import generate_slug

    from flows import is_generated_name, volume_run_name

    for _ in range(50):
        assert is_generated_name(generate_slug(2))
        assert is_generated_name(coolname.generate_slug(2))
    for typed in ("cancel-drill", "brain-rerun", "nightly-fix", "huge-test", "run 7"):
        assert not is_generated_name(typed), typed
        assert volume_run_name(typed, "brain-01") == typed
