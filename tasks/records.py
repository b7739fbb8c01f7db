"""What segflow keeps in the attributes of the stores it writes, as typed records.

Every store and output segflow writes carries a ``segflow`` attribute::

    store/zarr.json           StoreRecord: created_by (the ownership mark), role, the image
                              it was ingested from (source, ingest: status, keys, layout) or
                              made from (source_image), stats, image_digest and image_listing
                              (its identity), files (the files beside it that it owns)
    labels/<name>/zarr.json   OutputRecord: key (the run key), complete, the model and what
    probabilities/zarr.json   the outputs were made from (from, source_key), the objects of
                              instances, the exports made of them

Read with ``StoreRecord.of(node)`` (a zarr node, or its attributes as a dict); change with
:meth:`Record.updated` and write back with :meth:`Record.write`. Keys this version does not
know are kept as they are (a store written by a newer segflow stays readable), and records
are plain JSON in the store, so other tools read them too. The store-level functions
(completeness, identity) are :mod:`tasks.runstate`; ownership is :mod:`tasks.outputs`.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

#: The attribute every record lives under.
KEY = "segflow"
#: What segflow writes into ``created_by`` of the stores it makes.
OWNER = "segflow"


class Record(BaseModel):
    """A ``segflow`` attribute, typed; unknown keys are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @classmethod
    def of(cls, node: Any) -> Self:
        """The record of a zarr node (or of a dict of its attributes); empty when absent."""
        attrs = node if isinstance(node, dict) else dict(node.attrs.asdict())
        raw = attrs.get(KEY)
        return cls.model_validate(raw if isinstance(raw, dict) else {})

    def dump(self) -> dict[str, Any]:
        """The record as the JSON the store holds (fields never set are left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def updated(self, **fields: Any) -> Self:
        """A copy with ``fields`` set (by field name)."""
        data = {**self.model_dump(by_alias=False, exclude_unset=True), **fields}
        return type(self).model_validate(data)

    def write(self, node: Any) -> None:
        """Write the record into a zarr node's attributes (other attributes untouched)."""
        node.attrs.update({KEY: self.dump()})


class StoreRecord(Record):
    """The root of a store segflow made."""

    created_by: str | None = None
    role: str | None = None
    source_image: str | None = Field(None, description="the image these outputs are of")
    source: dict[str, Any] | None = Field(None, description="what the image was ingested from")
    ingest: dict[str, Any] | None = Field(None, description="the ingest: status, keys, layout")
    stats: dict[str, Any] | None = Field(None, description="global intensity statistics")
    image_digest: str | None = Field(None, description="the image's content digest")
    image_listing: str | None = Field(None, description="level 0 on storage when recorded")
    files: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="files beside the store that it owns, with identity"
    )

    @property
    def owned(self) -> bool:
        """Whether segflow made the store (``created_by``; earlier versions: ingest/role)."""
        return self.created_by == OWNER or self.ingest is not None or self.role is not None

    @property
    def ingest_status(self) -> str | None:
        return None if self.ingest is None else str(self.ingest.get("status", "")) or None

    @property
    def source_url(self) -> str | None:
        url = (self.source or {}).get("url")
        return str(url) if url else None

    @property
    def source_location(self) -> str | None:
        """Where the source was, resolved (absolute, links followed) when it was ingested,
        so that runs from other working folders name the same file the same way."""
        where = (self.source or {}).get("location") or self.source_url
        return str(where) if where else None


class OutputRecord(Record):
    """A label image (semantic or instances) or the probabilities of a store."""

    key: str | None = Field(None, description="the run key the outputs were written under")
    complete: bool = Field(False, description="every block is written under the key")
    model_digest: str | None = None
    model: str | None = None
    foreground_class: int = 1
    suggested_min_size: int = 0
    model_ndim: int | None = None
    link_iou: float | None = None
    made_from: str | None = Field(
        None, alias="from", description="the labels these outputs were derived from"
    )
    source_key: str | None = None
    classes: list[str] | None = None
    objects: int | None = None
    max_id: int | None = None
    min_size: int | None = Field(None, description="objects of fewer voxels were removed")
    min_size_unit: str | None = Field(None, description="voxels, or pixels for 2D labels")
    min_size_from: str | None = Field(None, description="option (given) or model")
    removed: int | None = Field(None, description="objects under the minimum size")
    method: str | None = None
    exports: dict[str, dict[str, Any]] = Field(default_factory=dict)


__all__ = ["KEY", "OWNER", "OutputRecord", "Record", "StoreRecord"]
