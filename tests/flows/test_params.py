"""One parameter schema per concept: the engine's parameters reach the CLI and the flows."""

from __future__ import annotations

import typer.main

from flows.segment import SegmentOptions, SegmentVolumeParams
from segflow.cli import _register, app
from tasks.segment import SegmentParams

#: Engine fields whose CLI option has another name (a flag that says the opposite).
CLI_NAMES = {"exact": "fast"}


def _cli_options(command: str) -> set[str]:
    _register()
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {p.name for p in cmd.params}


def test_flow_parameters_contain_every_engine_parameter():
    engine = set(SegmentParams.model_fields)
    assert engine <= set(SegmentOptions.model_fields)
    assert engine <= set(SegmentVolumeParams.model_fields)
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
