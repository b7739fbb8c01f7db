"""The inbox of a nightly run: which volumes are new, settled, and not yet processed.

A volume is a TIFF file (.tif/.tiff/.btf, see tasks.paths), a folder of 2D TIFF slices,
or an OME-Zarr image folder (.zarr) directly inside the inbox (a folder or an s3:// prefix).
Its identity is its path plus size and modification time (S3: size and ETag); the manifest
in the output location records the identity of every volume processed or failed, so a renamed
copy is new, an unchanged volume is never redone, and a volume that changed (re-exported)
is processed again. A volume modified less than ``settle_s`` ago is still arriving and is
left for the next night.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from tasks.paths import is_tiff_name, is_zarr_name, nightly_store
from tasks.store import filesystem, is_remote, join

MANIFEST = "segflow-inbox-manifest.json"

#: How long a volume must stay unmodified before a nightly run takes it: one definition for
#: the nightly flow's parameter and ``segflow serve``'s option.
SettleSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=7 * 24 * 3600,
        title="Settle time (s)",
        description="Volumes modified more recently than this are left for a later run.",
    ),
]
DEFAULT_SETTLE_S = 600.0


@dataclass(frozen=True)
class Candidate:
    path: str
    identity: dict[str, Any]
    modified: float  # unix time of the newest file

    @property
    def key(self) -> str:
        return json.dumps(self.identity, sort_keys=True)


def _info_time(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0


def _full(url: str, path: str) -> str:
    return f"s3://{path}" if is_remote(url) and not path.startswith("s3://") else path


def scan_inbox(inbox: str) -> list[Candidate]:
    """Volumes in the inbox with their identity (sorted by path)."""
    fs = filesystem(inbox)
    root = str(inbox).rstrip("/")
    out: list[Candidate] = []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        path = _full(inbox, entry["name"].rstrip("/"))
        if name.startswith("."):
            continue
        if entry["type"] == "file" and is_tiff_name(name):
            ident = {"path": path, "size": int(entry.get("size") or 0)}
            etag = entry.get("ETag") or entry.get("etag")
            ident["etag" if etag else "mtime"] = str(etag).strip('"') if etag else _info_time(entry)
            out.append(Candidate(path, ident, _info_time(entry)))
        elif entry["type"] == "directory":
            files = [f for f in fs.find(entry["name"], detail=True).values() if f["type"] == "file"]
            if not files:
                continue
            is_zarr = is_zarr_name(name)
            tiffs = [f for f in files if is_tiff_name(f["name"])]
            if not is_zarr and not tiffs:
                continue
            members = files if is_zarr else tiffs
            newest = max(_info_time(f) for f in members)
            ident = {
                "path": path,
                "files": len(members),
                "size": sum(int(f.get("size") or 0) for f in members),
                "newest": newest,
            }
            out.append(Candidate(path, ident, newest))
    return sorted(out, key=lambda c: c.path)


def read_manifest(output: str) -> dict[str, Any]:
    fs = filesystem(output)
    path = join(output, MANIFEST)
    if not fs.exists(path):
        return {"volumes": {}}
    with fs.open(path, "r") as f:
        data: dict[str, Any] = json.load(f)
    data.setdefault("volumes", {})
    return data


def write_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write atomically (local: rename; S3: one PUT)."""
    fs = filesystem(output)
    fs.makedirs(output, exist_ok=True)
    path = join(output, MANIFEST)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    if is_remote(output):
        fs.pipe(path, text.encode())
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def classify(
    candidates: list[Candidate], manifest: dict[str, Any], settle_s: float, now: float | None = None
) -> dict[str, list[Candidate]]:
    """Split candidates into new (to process), unsettled, done and failed-unchanged."""
    now = time.time() if now is None else now
    groups: dict[str, list[Candidate]] = {"new": [], "unsettled": [], "done": [], "failed": []}
    for c in candidates:
        record = manifest["volumes"].get(c.path)
        if record and record.get("identity") == c.identity:
            groups["done" if record.get("status") == "done" else "failed"].append(c)
        elif now - c.modified < settle_s:
            groups["unsettled"].append(c)
        else:
            groups["new"].append(c)
    return groups


def record(manifest: dict[str, Any], c: Candidate, status: str, **details: Any) -> dict[str, Any]:
    manifest["volumes"][c.path] = {
        "identity": c.identity,
        "status": status,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **details,
    }
    return manifest


def output_for(output: str, c: Candidate) -> str:
    """Where a volume's OME-Zarr goes: ``<output>/<entry name>.ome.zarr`` (see tasks.paths)."""
    return nightly_store(output, c.path)
