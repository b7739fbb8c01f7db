"""Run state kept in the output store: ownership, leases, image identity, completeness.

What a store holds so that runs can trust it (see DESIGN.md, "Run state")::

    store/zarr.json            segflow.created_by = "segflow": segflow made this store and
                               may write into it or delete it (``--overwrite``); it never
                               writes into a non-empty folder or store without this mark
    store/segflow-lease.json   the lease: holder, host, pid, what, heartbeat, expiry. One run
                               writes a store's outputs at a time; a second run waits or
                               refuses naming the holder; a lease whose holder died (or
                               whose heartbeat is older than its ttl) is taken over
    labels/<name>/zarr.json    segflow.key (the run key of the labels) and segflow.complete,
                               true only once every block is written; every reader refuses
                               incomplete labels (:func:`require_complete`)
    zarr.json (image)          segflow.image_digest: the image's identity, part of every
                               run key (combined per-unit checksums written at ingest; for
                               images segflow did not ingest, a digest of chunk names,
                               sizes and modification times or ETags)

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
    looked like on storage then (:func:`listing_digest`: chunk names, sizes, times, inodes
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
