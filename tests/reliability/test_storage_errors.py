"""Storage exceptions: one sentence each, the right exit status, transient vs permanent."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from segflow.errors import EXIT_CODES, ExitCode, describe_error, exit_code
from tasks.storage_errors import is_transient, retry_transient, translate_storage_error
from tasks.store import read_region
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
    StorageAccessError,
    StorageError,
    StoreConflictError,
    VolumeNotFoundError,
)

ROOT = Path(__file__).resolve().parents[2]


def client_error(code: str, status: int = 400) -> ClientError:
    response = {"Error": {"Code": code, "Message": f"{code} happened"}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def s3fs_style(exc: ClientError, err: OSError) -> OSError:
    """What s3fs raises: a builtin error whose cause is botocore's."""
    err.__cause__ = exc
    return err


TRANSIENT = [
    EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    TimeoutError("timed out"),
    client_error("SlowDown", 503),
    client_error("Throttling"),
    s3fs_style(client_error("ServiceUnavailable", 503), OSError(errno.EBUSY, "busy")),
    s3fs_style(client_error("InternalError", 500), OSError(errno.EREMOTEIO, "remote")),
]
PERMANENT = [
    InvalidVolumeError("x.tif: the TIFF is truncated"),
    FileNotFoundError(errno.ENOENT, "No such file", "x.tif"),
    OSError(errno.ENOSPC, "No space left on device", "/d/c/0"),
    PermissionError(errno.EACCES, "Permission denied", "/d"),
    client_error("AccessDenied", 403),
    client_error("NoSuchKey", 404),
    RuntimeError("Zstd decompression error: invalid input data"),
    json.JSONDecodeError("Expecting value", "{", 1),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient(exc):
    assert is_transient(exc)
    err = translate_storage_error(exc, "s3://b/img.zarr")
    assert isinstance(err, StorageError)
    assert is_transient(err)  # the translation keeps its cause
    assert exit_code(err) == ExitCode.STORAGE


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent(exc):
    assert not is_transient(exc)


def _write_chunk() -> None:
    try:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    except EndpointConnectionError as inner:
        raise OSError("could not write the chunk") from inner


def test_a_wrapped_transient_error_is_still_transient():
    with pytest.raises(OSError, match="could not write") as info:
        _write_chunk()
    assert is_transient(info.value)


@pytest.mark.parametrize(
    ("exc", "where", "kind", "text"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/o.zarr/0/c/1/0"),
            "/data/o.zarr",
            StorageError,
            "/data/o.zarr/0/c/1/0: no space left on the device",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/in.tif"),
            "/data/in.tif",
            StorageAccessError,
            "/data/in.tif: permission denied",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file", "/data/in.tif"),
            "/data",
            VolumeNotFoundError,
            "/data/in.tif: no such file",
        ),
        (
            OSError(errno.ELOOP, "Too many levels of symbolic links", "/data/loop"),
            "/data",
            InvalidVolumeError,
            "/data/loop: too many levels of symbolic links",
        ),
        (
            FileExistsError(errno.EEXIST, "File exists", "/data/plain"),
            "/data/plain/x.tif",
            StoreConflictError,
            "/data/plain: already exists",
        ),
        (
            client_error("InvalidAccessKeyId", 403),
            "s3://b/o.zarr",
            StorageAccessError,
            "s3://b/o.zarr: access denied by the storage service (check the credentials)",
        ),
        (
            client_error("NoSuchBucket", 404),
            "s3://b/o.zarr",
            StorageAccessError,
            "s3://b/o.zarr: the S3 bucket 'b' does not exist",
        ),
        (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            "s3://b/o.zarr",
            StorageError,
            "s3://b/o.zarr: the storage could not be reached",
        ),
        (
            RuntimeError("Zstd decompression error: invalid input data"),
            "/d/i.zarr/0/c/0/1",
            InvalidVolumeError,
            "/d/i.zarr/0/c/0/1: stored data cannot be decoded",
        ),
        (
            json.JSONDecodeError("Expecting value", "{", 1),
            "/d/i.zarr",
            InvalidVolumeError,
            "/d/i.zarr: the zarr metadata is damaged",
        ),
    ],
)
def test_translation_names_the_file_and_the_problem(exc, where, kind, text):
    err = translate_storage_error(exc, where)
    assert isinstance(err, kind)
    assert str(err).startswith(text)
    assert "\n" not in str(err)
    message, code = describe_error(exc, where)
    assert message == str(err)
    assert code == EXIT_CODES[kind]


def test_other_errors_are_not_storage_errors():
    assert translate_storage_error(ZeroDivisionError("division by zero"), "x") is None
    message, code = describe_error(ZeroDivisionError("division by zero"))
    assert code == ExitCode.OTHER
    assert message.startswith("unexpected ZeroDivisionError: division by zero")
    assert "--debug" in message


def test_read_region_names_the_damaged_chunk(tmp_path):
    arr = zarr.open_group(tmp_path / "s.zarr", mode="w").create_array(
        "0", shape=(6, 6), chunks=(3, 3), dtype="u1"
    )
    arr[...] = 1
    (tmp_path / "s.zarr" / "0" / "c" / "1" / "0").write_bytes(b"garbage")
    arr = zarr.open_group(tmp_path / "s.zarr", mode="r")["0"]
    assert np.array_equal(read_region(arr, (slice(0, 3), slice(0, 6)), "S"), np.ones((3, 6)))
    with pytest.raises(InvalidVolumeError, match=r"^S/0/c/1/0: stored data cannot be decoded"):
        read_region(arr, (slice(0, 6), slice(0, 6)), "S")


def test_prefect_retries_only_transient_failures():
    from prefect.states import Failed

    from flows.segment import ingest_step

    assert ingest_step.retry_condition_fn is retry_transient
    truncated = InvalidVolumeError("x.tif: the TIFF is truncated")
    assert not retry_transient(None, None, Failed(data=truncated))
    assert retry_transient(None, None, Failed(data=ConnectionResetError("reset")))


def test_exit_codes_are_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\d+)` \| ([^|]+) \|", readme, flags=re.MULTILINE))
    assert {int(k) for k in table} == {int(c) for c in ExitCode}


class WrappingError(SegflowError, RuntimeError):
    """The shape of an error that wraps another, like the runner's failed block."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


def test_an_error_wrapping_a_cause_takes_its_kind():
    outage = WrappingError(
        "segment block (0, 1) of s3://b/o.zarr failed: cannot connect",
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    )
    assert is_transient(outage)
    assert describe_error(outage) == (str(outage), ExitCode.STORAGE)
    damaged = WrappingError("block (0, 0) failed", InvalidVolumeError("x.zarr/0/c/0/0: damaged"))
    assert not is_transient(damaged)
    assert describe_error(damaged)[1] == ExitCode.BAD_INPUT
