"""One schema per concept: the options of a pipeline run, as pydantic models.

The ``segflow`` CLI generates its options from these fields (``--name-with-dashes``, same
defaults, choices, bounds and help; :mod:`segflow.options`) and the Prefect flows take them
as parameters (the run form), so the two doors cannot drift apart:

- :class:`tasks.segment.SegmentParams`: how the network runs (chunks, tile, device, mode, ...)
- :class:`IngestOptions`: how a TIFF source is read (axes, voxel size)
- :class:`InstanceOptions`: objects across chunks (instances, min size, method, ...)
- :class:`RunOptions`: resume, overwrite, leases, preview
- :class:`PipelineOptions`: all of them, the one options object of :mod:`tasks.pipeline`
- :class:`tasks.cluster.ClusterSpec`: where the Dask workers run

Messages of the engine name a field with :func:`unet_core.errors.opt`; each door renders it
in its own words (the CLI's flag, the form's title).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
)

from tasks.cluster import ClusterSpec
from tasks.paths import LABEL_NAME_PATTERN
from unet_core.config import DEFAULT_BATCH_SIZE, Mode


def comma_list(value: Any) -> Any:
    """A list as a person types it, ``64,256,256`` (or ``64x256x256``), as a tuple;
    anything else goes to the model unchanged."""
    if isinstance(value, str) and value.strip():
        return tuple(p.strip() for p in value.replace("x", ",").split(",") if p.strip())
    return value


def _as_text(value: tuple[Any, ...]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"

#: A shape (chunks, tile): integers written ``64,256,256`` in a form, on a command line or
#: in JSON (a list is accepted too); the run form shows one text field.
Shape = Annotated[
    tuple[int, ...],
    BeforeValidator(comma_list),
    PlainSerializer(_as_text, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^\s*[0-9]+(\s*[,x]\s*[0-9]+)*\s*$"}),
]
#: Sizes (a voxel size): numbers written ``2.0,0.5,0.5``, like :data:`Shape`.
Sizes = Annotated[
    tuple[float, ...],
    BeforeValidator(comma_list),
    PlainSerializer(_as_text, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": rf"^\s*{_NUMBER}(\s*,\s*{_NUMBER})*\s*$"}),
]


class SegmentParams(BaseModel):
    """How to segment: shared by the CLI and the Prefect flows (renders as a UI form)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunks: Shape | None = Field(
        None,
        description="Output chunk shape per spatial axis (default: the image's chunks).",
        examples=["64,256,256"],
    )
    tile: Shape | None = Field(
        None,
        description="Largest tile input shape per spatial axis (default: chosen from the model).",
        examples=["1,572,572"],
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    batch_size: int = Field(
        DEFAULT_BATCH_SIZE,
        ge=1,
        le=256,
        description="Tiles per forward pass (a 3D network's default-mode tile fills one alone).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    mode: Mode = Field(
        "invariant",
        description=(
            "invariant: bitwise the same result for any chunks, workers or resumed runs, "
            "fast kernels; reference: bitwise equal to one whole-volume pass (CPU, slow); "
            "fast: tiles planned per block, equal up to float rounding."
        ),
    )
    probabilities: bool = Field(False, description="Also write class probabilities.")
    probabilities_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Data type of the written probabilities."
    )
    channel: int | None = Field(
        None, ge=0, description="Use only this channel of a multi-channel image."
    )
    labels_name: str = Field(
        "semantic",
        min_length=1,
        max_length=64,
        pattern=LABEL_NAME_PATTERN,
        description="Name of the labels image written under labels/ (letters, digits, _ . -; "
        "not starting with a dot).",
    )

    @field_validator("labels_name", mode="before")
    @classmethod
    def _one_path_element(cls, value: Any) -> Any:
        """A label name is one folder of the store, never ``.``, ``..`` or a path."""
        if isinstance(value, str) and not re.fullmatch(LABEL_NAME_PATTERN, value):
            raise ValueError(
                "is not a label name: one word of letters, digits, _ . - that does not start "
                "with a dot"
            )
        return value

    def output_fields(self) -> dict[str, Any]:
        """The fields that change what is written (device and batch size do not)."""
        fields = self.model_dump(exclude={"device", "batch_size"})
        if not self.probabilities:
            fields.pop("probabilities_dtype")
        return fields


class IngestOptions(BaseModel):
    """How a TIFF source is read when a run ingests it first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    axes: str | None = Field(
        None,
        pattern=r"^[A-Za-z]{2,6}$",
        description="Axes of a TIFF source as tifffile shapes it, e.g. zyx, zcyx or yxc "
        "(default: from its metadata; a plain stack of planes reads as zyx).",
        examples=["zyx"],
    )
    voxel_size: Sizes | None = Field(
        None,
        description="Physical voxel size Z,Y,X (or Y,X) in micrometres of a TIFF source "
        "(default: from its metadata).",
        examples=["2.0,0.5,0.5"],
    )

    @field_validator("voxel_size")
    @classmethod
    def _finite_positive(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None:
            if not 2 <= len(value) <= 3:
                raise ValueError(
                    f"a voxel size has 2 or 3 numbers (Y,X or Z,Y,X), got {len(value)}"
                )
            for v in value:
                if not (math.isfinite(v) and v > 0):
                    raise ValueError(f"voxel sizes must be finite and positive, got {v:g}")
        return value


class IngestParams(IngestOptions):
    """How ``segflow ingest`` writes an image: its options besides the source's axes and
    voxel size (shared with every run that ingests a TIFF)."""

    chunks: Shape | None = Field(
        None,
        min_length=2,
        max_length=4,
        description="Chunk shape Z,Y,X (or Y,X); default 64,128,128 (3D), 1024,1024 (2D); "
        "never larger than the image.",
    )
    compression: Literal["zstd", "blosc", "none"] = Field(
        "zstd", description="How the chunks are compressed."
    )
    levels: int = Field(0, ge=0, le=10, description="Downsampled pyramid levels to add.")
    unit_mib: float = Field(
        8.0, gt=0, le=65536, description="Most MiB of the image one task holds at a time."
    )
    allow_sparse: bool = Field(
        False, description="Accept a TIFF that declares far more pixels than its file holds."
    )


class InstanceOptions(BaseModel):
    """Objects: connected components (or slice objects linked by overlap) across chunks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instances: bool = Field(
        False, description="Also label objects across chunks (instances and an object table)."
    )
    min_size: int | None = Field(
        None,
        ge=0,
        description="Remove objects of fewer voxels (pixels for a 2D image); ids stay "
        "consecutive. Default: the model's training object sizes in those units (a 2D "
        "model's areas converted to voxels for a stack).",
    )
    connectivity: int = Field(
        1, ge=1, le=3, description="Which neighbours touch: 1 faces, 2 also edges, 3 corners."
    )
    instance_method: Literal["auto", "components", "slices"] = Field(
        "auto",
        description="components (3D connected components) or slices (2D objects linked "
        "across slices by overlap); auto: slices for a stack segmented by a 2D model.",
    )
    link_iou: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="With slices: IoU that links objects of consecutive slices (default: "
        "the model's).",
    )


class RunOptions(BaseModel):
    """How a run treats earlier work and other runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    force: bool = Field(False, description="Recompute finished blocks instead of reusing them.")
    overwrite: bool = Field(
        False,
        description="Replace outputs segflow made earlier that are in the way (an ingest of "
        "this source with other settings); never anything segflow did not make.",
    )
    lease_wait_s: float = Field(
        0.0,
        ge=0,
        le=24 * 3600,
        description="Seconds to wait for another run writing the same outputs, then refuse.",
    )
    preview: bool = Field(
        True,
        description="Write a preview PNG beside the store: orthogonal middle slices with the "
        "labels outlined.",
    )


class PipelineOptions(RunOptions, InstanceOptions, IngestOptions, SegmentParams):
    """Everything one run of the pipeline takes besides its source, model and outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def engine(self) -> SegmentParams:
        """The engine's parameters (every field of :class:`SegmentParams`, nothing else)."""
        return SegmentParams.model_validate(
            self.model_dump(include=set(SegmentParams.model_fields))
        )

    def pick(self, model: type[BaseModel]) -> dict[str, object]:
        """The values of ``model``'s fields (e.g. :class:`InstanceOptions`)."""
        return self.model_dump(include=set(model.model_fields))


#: The concepts a run's options fall into, in the order the CLI's help panels and the run
#: form's groups list them.
GROUPS: dict[type[BaseModel], str] = {
    SegmentParams: "Network and tiles",
    InstanceOptions: "Objects (instances)",
    IngestOptions: "Reading a TIFF source",
    RunOptions: "Resume, overwrite, leases, preview",
    ClusterSpec: "Cluster: where the Dask workers run",
}

__all__ = [
    "GROUPS",
    "IngestOptions",
    "IngestParams",
    "InstanceOptions",
    "PipelineOptions",
    "RunOptions",
    "SegmentParams",
    "Shape",
    "Sizes",
]
