"""Run state a store holds so that runs can trust it: the image's identity and whether
outputs are complete (the records themselves are :mod:`tasks.records`; leases are
:mod:`tasks.lease`; ownership and what may be written where, :mod:`tasks.outputs`)::

    zarr.json (image)          segflow.image_digest and image_listing: the image's identity,
                               part of every run key (:func:`image_digest`: the content
                               digest recorded at ingest, and the level-0 listing re-read
                               at every run, so an in-place edit is a new image)
    labels/<name>/zarr.json    segflow.key (the run key of the labels) and segflow.complete,
                               true only once every block is written; every reader refuses
                               incomplete labels (:func:`require_complete`)

Reading what a run wrote, with missing chunks as errors, is :mod:`tasks.reads`.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.records import OutputRecord, StoreRecord
from tasks.store import (
    attributes,
    listing_digest,
    open_group,
)
from unet_core.errors import (
    IncompleteError,
    InvalidVolumeError,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------- image identity


def image_digest(url: str, attrs: dict[str, Any] | None = None) -> str:
    """The identity of the image at ``url`` as it is now.

    A store segflow ingested (or wrote) records its content digest and what its level 0
    looked like on storage then (:func:`listing_digest`: chunk names, sizes and times
    or ETags). The listing is read again at every run: unchanged, the identity is the
    recorded digest; changed (the array was rewritten in place after its ingest), the
    current listing is part of the identity, so the labels are recomputed. A store segflow
    did not make is identified by its listing alone."""
    record = StoreRecord.of(attributes(open_group(url, "r")) if attrs is None else attrs)
    listing = listing_digest(url)
    if not record.image_digest:
        return listing
    if record.image_listing == listing:
        return record.image_digest
    return f"{record.image_digest}+{listing}"


# ------------------------------------------------------------------------- completeness


def set_complete(store: str, path: str, complete: bool, **extra: Any) -> None:
    """Record in the group at ``path`` whether all of its blocks are written."""
    group = open_group(store, "r+")[path]
    OutputRecord.of(group).updated(**extra, complete=bool(complete)).write(group)


def require_complete(store: str, path: str, what: str) -> OutputRecord:
    """The record of the outputs at ``path``; refuse them unless complete."""
    try:
        group = open_group(store, "r")[path]
    except KeyError:
        raise InvalidVolumeError(f"{store}: there are no {what} at '{path}'") from None
    record = OutputRecord.of(group)
    if not record.complete:
        raise IncompleteError(
            f"{store}: the {what} at '{path}' are incomplete (a run stopped before writing "
            "every block); run the step that makes them again to finish them"
        )
    return record
