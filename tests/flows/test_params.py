"""One parameter schema per concept: the engine's parameters reach the CLI and the flows."""

from __future__ import annotations

import typer.main

from flows.nightly import nightly_inbox
from flows.segment import SegmentOptions, SegmentVolumeParams, segment_volume
from flows.train import train_model
from segflow.cli import _register, app
from tasks.segment import SegmentParams

#: Engine fields whose CLI option has another name (a flag that says the opposite).
CLI_NAMES = {"mode": "fast"}  # --fast / --reference (default: invariant)


def _cli_options(command: str) -> set[str]:
    _register()
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {p.name for p in cmd.params}


def test_flow_parameters_contain_every_engine_parameter():
    engine = set(SegmentParams.model_fields)
    assert engine <= set(SegmentOptions.model_fields)
    assert engine <= set(SegmentVolumeParams.model_fields)
    # each one is a top-level parameter of both flows (settable with --param NAME=VALUE)
    for fl in (segment_volume, nightly_inbox):
        props = fl.parameters.model_dump()["properties"]
        assert engine <= set(props), sorted(engine - set(props))
    # and the flow hands them to the engine unchanged
    options = SegmentOptions(channel=1, probabilities_dtype="float32", tile=(1, 64, 64))
    assert options.engine() == SegmentParams(
        channel=1, probabilities_dtype="float32", tile=(1, 64, 64)
    )


def test_cli_segment_has_an_option_for_every_engine_parameter():
    options = _cli_options("segment")
    missing = {
        name for name in SegmentParams.model_fields if CLI_NAMES.get(name, name) not in options
    }
    assert not missing, f"segflow segment lacks options for {sorted(missing)}"


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
    import pytest
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="batch_size"):
        segment_volume.validate_parameters({"source": "a.tif", "model": "m", "batch_size": 0})
    ok = segment_volume.validate_parameters({"source": "a.tif", "model": "m", "batch_size": 2})
    assert ok["batch_size"] == 2
