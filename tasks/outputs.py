"""The output policy: what segflow may write where. Every file and store it writes passes
here, whichever command or flow asked for it.

1. A target is never an input of the run (the same file, also through a link), never
   inside an input (a store, a folder of slices), never inside any zarr store (a chunk),
   and never holds an input (a folder the inputs are in, for outputs that are folders).
2. A store is written only when it is absent, empty, or a store segflow made; an existing
   file only when segflow made it. Anything else is refused, ``--overwrite`` or not.
3. Never another image's store: outputs of image A never go into a store that holds image
   B or B's outputs.
4. ``--overwrite`` replaces only what segflow made; without it a finished output that
   segflow made is refused too, except files *beside a store*, which belong to the store
   (recorded in its attributes: name, size, modification time or ETag) and are replaced or
   removed with it. A file beside a store that the record does not match (someone put or
   edited a file there) is the user's and is never replaced or removed.
5. Every file is written under a temporary name and renamed into place (one PUT on S3).

Files segflow makes on their own (``export --to``, checkpoints) carry a signature that
says so: a TIFF's Software tag, a checkpoint's format header (:func:`made_by_segflow`).
Inbox and output locations may not overlap (:func:`check_disjoint`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import zarr

from tasks.lease import LEASE_FILE, lease_status
from tasks.paths import special_file
from tasks.records import OWNER, StoreRecord
from tasks.store import (
    check_access,
    filesystem,
    is_remote,
    join,
    open_group,
)
from unet_core.errors import (
    StorageAccessError,
    StoreConflictError,
    opt,
)

FileKind = Literal["tiff", "checkpoint", "beside"]


# ------------------------------------------------------------------------------- paths


def canonical(path: str) -> str:
    """A path or URL in one spelling: local paths absolute with links resolved (also when
    the path does not exist yet), URLs without a trailing slash."""
    text = str(path)
    if is_remote(text):
        return text.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(text)))


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _same_file(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return canonical(a) == canonical(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return canonical(a) == canonical(b)


def _zarr_ancestor(path: str) -> str | None:
    """The nearest folder above ``path`` (or ``path`` itself) that is a zarr node."""
    if is_remote(path):
        fs = filesystem(path)
        parts = canonical(path).split("/")
        for i in range(len(parts), 3, -1):
            here = "/".join(parts[:i])
            with contextlib.suppress(Exception):
                if fs.exists(join(here, "zarr.json")):
                    return here
        return None
    here = canonical(path)
    while True:
        if os.path.isfile(os.path.join(here, "zarr.json")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


@dataclass(frozen=True)
class RunInputs:
    """What a run reads: files and folders (TIFFs, slice folders, stores, checkpoints).

    :meth:`of` adds, for each store segflow ingested, the source it was ingested from (a
    TIFF that an export must never replace)."""

    paths: tuple[str, ...] = ()

    @classmethod
    def of(cls, *paths: str | os.PathLike[str] | None) -> RunInputs:
        found: list[str] = []
        for p in paths:
            if p is None or str(p) == "":
                continue
            for text in _expand(str(p)):
                found.append(text)
                source = _ingested_from(text)
                if source:
                    found.append(source)
        return cls(tuple(dict.fromkeys(found)))

    def collision(self, target: str) -> str | None:
        """How ``target`` collides with an input, in words (None: it does not)."""
        t = canonical(target)
        for p in self.paths:
            c = canonical(p)
            if t == c or (_exists(target) and _same_file(target, p)):
                return f"it is the input {p}"
            if _inside(t, c):
                return f"it is inside the input {p}"
            if _inside(c, t):
                return f"it holds the input {p}"
        return None


def _expand(path: str) -> list[str]:
    """A path as given, or for a local glob ('raw/*.tif') the files it matches (a path that
    exists is itself, whatever its characters: a folder named 'stack[2]')."""
    if is_remote(path) or not any(ch in path for ch in "*?[") or _exists(path):
        return [path]
    import glob

    return sorted(glob.glob(path)) or [path]


def _ingested_from(store: str) -> str | None:
    """The source a store segflow made was ingested from (where it was), if any."""
    if not is_remote(store) and not os.path.isfile(os.path.join(store, "zarr.json")):
        return None
    record = store_record(store)
    return record.source_location if record is not None else None


# --------------------------------------------------------------------------- stores


def _children(url: str) -> list[str]:
    """What a store folder holds, less segflow's lease (a run's own, taken before writing)."""
    if is_remote(url):
        fs = filesystem(url)
        try:
            names = (
                [str(p) for p in fs.ls(url, refresh=True, detail=False)] if fs.exists(url) else []
            )
        except FileNotFoundError:
            return []
        names = [f"{url.split('://', 1)[0]}://{n}" if "://" not in n else n for n in names]
    elif os.path.isdir(url):
        names = [os.path.join(url, n) for n in os.listdir(url)]
    else:
        return [url] if os.path.lexists(url) else []
    return [n for n in names if not n.rstrip("/").rsplit("/", 1)[-1].startswith(LEASE_FILE)]


def store_exists(url: str) -> bool:
    """Whether ``url`` holds anything (an empty folder, or one with only a lease, is
    nothing)."""
    return bool(_children(url))


def store_record(url: str) -> StoreRecord | None:
    """The root record of a store (None: no zarr group there)."""
    try:
        return StoreRecord.of(open_group(url, "r"))
    except Exception:
        return None


def owned_by_segflow(url: str) -> bool:
    """Whether ``url`` is a zarr store that segflow made (its root record says so)."""
    record = store_record(url)
    return record is not None and record.owned


def _is_zarr(url: str) -> bool:
    if is_remote(url):
        return bool(filesystem(url).exists(join(url, "zarr.json")))
    return os.path.isfile(os.path.join(url, "zarr.json"))


def refuse_foreign(url: str, hint: str = "choose a new or empty location") -> None:
    """Raise :class:`StoreConflictError` unless ``url`` is absent, empty or a store segflow
    made: segflow never writes into, or replaces, anything else."""
    if store_exists(url) and not owned_by_segflow(url):
        what = "a zarr store" if _is_zarr(url) else "other files"
        raise StoreConflictError(
            f"{url}: already holds {what} that segflow did not make; it is never replaced, "
            f"not even with {opt('overwrite')}, and segflow writes only into stores it made "
            f"({hint})"
        )


def store_image(url: str) -> str | None:
    """The image a segflow store belongs to, as a canonical location: the store itself
    when it holds an image (it was ingested or written as one), else the image its
    outputs were made from. None when it holds neither (or is not segflow's)."""
    record = store_record(url)
    if record is None:
        return None
    if record.ingest is not None or record.image_digest or record.role == "image":
        return canonical(url)
    return canonical(record.source_image) if record.source_image else None


def check_writable(url: str) -> None:
    """A local folder or store that exists and can be written, or can be made."""
    path = os.path.abspath(url)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreConflictError(f"{url}: is a file, not a store (choose another location)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise StoreConflictError(f"{url}: {probe} is a file, so no store can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageAccessError(
            f"{url}: cannot write here (permission denied on {probe}); choose a location "
            "you can write"
        )


def check_store_target(
    url: str,
    inputs: RunInputs = RunInputs(),
    *,
    image: str | None = None,
    lease_wait_s: float = 0.0,
    hint: str = "choose a new or empty location",
) -> None:
    """Before any work: may a run write its outputs into the store ``url``?

    Reachable and writable; not an input, inside one, or holding one (``url`` may *be* the
    image store the run segments, ``image``, whose labels it writes); absent, empty or
    segflow's; not the store of an image other than ``image``; not being written by another
    run (unless the run will wait for it). Writes nothing."""
    url = str(url).rstrip("/") or "/"
    if is_remote(url):
        check_access(url)
    else:
        check_writable(url)
    if image is None or canonical(url) != canonical(image):
        clash = inputs.collision(url)
        if clash is not None:
            raise StoreConflictError(
                f"{url}: segflow does not write its outputs here: {clash} ({hint})"
            )
        ancestor = _zarr_ancestor(os.path.dirname(canonical(url)) if not is_remote(url) else url)
        if ancestor is not None and canonical(ancestor) != canonical(url):
            raise StoreConflictError(
                f"{url}: is inside the zarr store {ancestor}; outputs never go into another "
                f"store's folders ({hint})"
            )
    refuse_foreign(url, hint)
    if image is not None and store_exists(url):
        belongs = store_image(url)
        if belongs is not None and belongs != canonical(image):
            raise StoreConflictError(
                f"{url}: holds the image or outputs of another image ({belongs}); outputs "
                f"of {image} never go into it, not even with {opt('overwrite')} ({hint})"
            )
    lease_status(url, lease_wait_s)


def check_folder_target(url: str, inputs: RunInputs = RunInputs(), hint: str = "") -> None:
    """Before any work: may a run put its outputs (stores, files) into the folder ``url``?
    Writable; never an input, inside one, or holding one (the next run would take the
    outputs for inputs); never inside a zarr store. Other files in it stay untouched."""
    url = str(url).rstrip("/") or "/"
    if is_remote(url):
        check_access(url)
    else:
        check_writable(url)
    tail = f" ({hint})" if hint else ""
    clash = inputs.collision(url)
    if clash is not None:
        raise StoreConflictError(
            f"{url}: segflow does not put its outputs here: {clash}, and the next run would "
            f"take the outputs for inputs{tail}"
        )
    ancestor = _zarr_ancestor(url)
    if ancestor is not None:
        raise StoreConflictError(
            f"{url}: is inside the zarr store {ancestor}; outputs never go into another "
            f"store's folders{tail}"
        )


def claim_store(url: str, role: str, **attrs: Any) -> zarr.Group:
    """Open ``url`` for writing outputs: create it (marked as segflow's) when absent or
    empty, reuse it when segflow made it, refuse anything else in one sentence."""
    refuse_foreign(url)
    if store_exists(url):
        return open_group(url, "r+")
    root = open_group(url, "a")  # "w" would delete the run's lease
    StoreRecord(created_by=OWNER, role=role, **attrs).write(root)
    return root


def delete_owned_store(url: str) -> list[str]:
    """Delete a store segflow made (``--overwrite``) and the files beside it that it owns;
    anything else is refused. Returns the files removed beside it."""
    if not store_exists(url):
        return []
    if not owned_by_segflow(url):
        raise StoreConflictError(
            f"{url}: is not a store made by segflow, so it is not deleted even with "
            f"{opt('overwrite')}; choose another destination"
        )
    removed = remove_owned_files(url)
    fs = filesystem(url)
    for child in _children(url):  # everything but the lease, which the deleting run holds
        fs.rm(child, recursive=True)
    return removed


# ----------------------------------------------------------------------------- files


def _exists(path: str) -> bool:
    if is_remote(path):
        return bool(filesystem(path).exists(path))
    return os.path.lexists(path)


def made_by_segflow(path: str, kind: FileKind) -> bool:
    """Whether the file at ``path`` carries segflow's signature for its kind: a TIFF whose
    Software tag is segflow's, a checkpoint in segflow's format."""
    if is_remote(path) or not os.path.isfile(path):
        return False
    try:
        if kind == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return str(tif.pages[0].software or "").startswith(OWNER)  # type: ignore[union-attr]
        if kind == "checkpoint":
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if len(pickles) != 1 or archive.getinfo(pickles[0]).file_size > 1 << 20:
                    return False
                from unet_core.checkpoint import FORMAT

                return FORMAT.encode() in archive.read(pickles[0])
    except Exception:
        return False
    return False


def file_identity(path: str) -> dict[str, Any] | None:
    """What identifies a file's current content for the ownership record (None: absent)."""
    if is_remote(path):
        fs = filesystem(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified")
        return {"size": int(info.get("size") or 0), "etag": str(tag).strip('"')}
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "inode": int(st.st_ino)}


def _record(store: str) -> dict[str, Any]:
    record = store_record(store)
    return dict(record.files) if record is not None else {}


def _owned_name(store: str, path: str) -> str:
    """How a file beside ``store`` is named in its record (its path relative to the folder
    that holds the store)."""
    folder = canonical(store).rsplit("/", 1)[0]
    full = canonical(path)
    return full[len(folder) + 1 :] if _inside(full, folder) else full


def owns_file(store: str, path: str) -> bool:
    """Whether ``path`` is a file the store ``store`` owns: recorded, and unchanged since."""
    current = file_identity(path)
    recorded = _record(store).get(_owned_name(store, path))
    return current is not None and recorded == current


def _set_record(store: str, name: str, identity: dict[str, Any] | None) -> None:
    root = open_group(store, "r+")
    record = StoreRecord.of(root)
    files = dict(record.files)
    if identity is None:
        files.pop(name, None)
    else:
        files[name] = identity
    record.updated(files=files).write(root)


def _owner_elsewhere(path: str, owner: str | None) -> str | None:
    """A store beside ``path`` (in the same folder) whose record lists ``path`` as its
    file, other than ``owner`` (None: no such store)."""
    if is_remote(path):
        return None
    folder = os.path.dirname(canonical(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in names:
        store = os.path.join(folder, name)
        if not name.endswith(".zarr") or not os.path.isfile(os.path.join(store, "zarr.json")):
            continue
        if owner is not None and canonical(store) == canonical(owner):
            continue
        record = store_record(store)
        if record is not None and _owned_name(store, path) in record.files:
            return store
    return None


def check_file_target(
    path: str,
    kind: FileKind,
    inputs: RunInputs = RunInputs(),
    *,
    overwrite: bool = False,
    owner: str | None = None,
    what: str = "output",
    option: str = "overwrite",
) -> None:
    """Before any work: may a run write the file ``path``? Refused: a folder or special
    file there; an input of the run, inside one, or inside a zarr store; a file segflow did
    not make; a file segflow made without ``overwrite`` (files of kind ``beside`` belong to
    the store ``owner`` and are replaced with it when its record matches). Writes nothing."""
    path = str(path)
    special = special_file(path)
    if special is not None:
        raise StoreConflictError(
            f"{path}: is {special}, not a file segflow can write its {what} to"
        )
    if not is_remote(path) and os.path.isdir(path):
        raise StoreConflictError(f"{path}: is a folder; name a file for the {what}")
    clash = inputs.collision(path)
    if clash is not None:
        raise StoreConflictError(
            f"{path}: segflow never writes its {what} over its inputs: {clash}; choose "
            "another file name"
        )
    ancestor = _zarr_ancestor(path)
    if ancestor is not None:
        raise StoreConflictError(
            f"{path}: is inside the zarr store {ancestor}; segflow never writes files into "
            "a store's folders (choose a file outside it)"
        )
    if not _exists(path):
        return
    if kind == "beside":
        if owner is not None and owns_file(owner, path):
            return
        raise StoreConflictError(
            f"{path}: already exists and segflow did not write it for {owner or 'this run'} "
            f"(it is never replaced, not even with {opt(option)}); move it away or choose "
            "another output location"
        )
    other = _owner_elsewhere(path, owner)
    if other is not None:
        raise StoreConflictError(
            f"{path}: is a file of the store {other} (recorded there), replaced only with "
            "that store's own outputs; choose another file name"
        )
    if not made_by_segflow(path, kind):
        raise StoreConflictError(
            f"{path}: already exists and segflow did not make it (it is never replaced, not "
            f"even with {opt(option)}); choose another file name"
        )
    if not overwrite:
        raise StoreConflictError(
            f"{path}: already holds segflow's {what} from an earlier run; pass {opt(option)} "
            "to replace it, or choose another file name"
        )


def write_file(
    path: str,
    write: Callable[[Any], None],
    *,
    binary: bool = False,
    owner: str | None = None,
) -> str:
    """Write a file under a temporary name and rename it into place (one PUT on S3); with
    ``owner`` (a store) record it as the store's file.

    A crash or a full disk leaves the old file (or none), never a truncated one under the
    final name."""
    mode = "wb" if binary else "w"
    if is_remote(path):
        fs = filesystem(path)
        with fs.open(path, mode) as f:
            write(f)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    if owner is not None:
        _set_record(owner, _owned_name(owner, path), file_identity(path))
    return path


def adopt_file(owner: str, path: str) -> None:
    """Record ``path`` (just written by segflow, e.g. through a library that writes files
    itself) as a file of the store ``owner``."""
    _set_record(owner, _owned_name(owner, path), file_identity(path))


def remove_owned_file(store: str, path: str) -> bool:
    """Remove ``path`` if the store owns it (its record matches); returns whether it did.
    A file there that the store does not own is left alone."""
    if not owns_file(store, path):
        return False
    filesystem(path).rm(path)
    _set_record(store, _owned_name(store, path), None)
    return True


def remove_owned_files(store: str) -> list[str]:
    """Remove every file beside ``store`` that it owns; returns their paths."""
    folder = canonical(store).rsplit("/", 1)[0]
    removed = []
    for name in list(_record(store)):
        path = name if name.startswith("/") or "://" in name else f"{folder}/{name}"
        if remove_owned_file(store, path):
            removed.append(path)
    return removed


def check_disjoint(a: str, b: str, what_a: str, what_b: str) -> None:
    """Two locations that must not overlap (an inbox and its output: the outputs would be
    taken as new inputs the next night)."""
    ca, cb = canonical(a), canonical(b)
    if ca == cb or _inside(ca, cb) or _inside(cb, ca):
        raise StoreConflictError(
            f"{what_a} {a} and {what_b} {b} overlap: segflow would take its own outputs as "
            f"inputs; choose an {what_b} outside the {what_a}"
        )


def check_files(
    targets: Iterable[tuple[str, FileKind]],
    inputs: RunInputs,
    *,
    overwrite: bool = False,
    owner: str | None = None,
) -> None:
    """:func:`check_file_target` for several files."""
    for path, kind in targets:
        check_file_target(path, kind, inputs, overwrite=overwrite, owner=owner)


__all__: Sequence[str] = [
    "OWNER",
    "RunInputs",
    "adopt_file",
    "canonical",
    "check_disjoint",
    "check_file_target",
    "check_files",
    "check_folder_target",
    "check_store_target",
    "check_writable",
    "claim_store",
    "delete_owned_store",
    "file_identity",
    "made_by_segflow",
    "owned_by_segflow",
    "owns_file",
    "refuse_foreign",
    "remove_owned_file",
    "remove_owned_files",
    "store_exists",
    "store_image",
    "write_file",
]
