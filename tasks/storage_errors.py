"""Storage errors: which failures are transient (a later attempt may not meet them) and one
clear segflow error, naming the file, for any exception storage raised.

Covers zarr metadata and codec errors (a broken ``zarr.json``, a damaged chunk),
fsspec/s3fs/botocore errors (missing bucket or key, credentials, unreachable endpoint,
throttling) and ``OSError`` (full disk, permissions, missing files, symlink loops). Kept
apart from the stores themselves (:mod:`tasks.store`) so that the error boundary of the CLI
and the runner's retries read one classification.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import Any

from tasks.paths import is_remote
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
    StorageAccessError,
    StorageError,
    StoreConflictError,
    VolumeNotFoundError,
)

#: Exception classes (by name, so that botocore/aiohttp need not be imported) of failures
#: that a later attempt may not meet: the connection, not the data, is at fault.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "HTTPClientError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "FSTimeoutError",
        "IncompleteRead",
        "ProtocolError",
    }
)
#: S3 error codes of throttling and passing service failures.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
        "403",
    }
)
_CREDENTIAL_NAMES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchVersion", "404"})
_CODEC_WORDS = ("decompress", "compress", "zstd", "blosc", "codec", "checksum", "crc32")
_CODEC_MODULES = ("/numcodecs/", "/zarr/codecs/", "/zarr/core/codec_pipeline", "/zarr/core/buffer")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from: ``__cause__``, a ``cause`` attribute
    (an error that wraps another, e.g. a failed block), or the shown ``__context__``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or _wrapped(e) or (None if e.__suppress_context__ else e.__context__)


def _wrapped(e: BaseException) -> BaseException | None:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else None


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _s3_code(e: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (None for anything else)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict) and error.get("Code") is not None:
            return str(error["Code"])
    return None


def _transient_one(e: BaseException) -> bool:
    if _names(e) & _TRANSIENT_NAMES or _s3_code(e) in _TRANSIENT_CODES:
        return True
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass if the same work is tried again later.

    Transient: connection resets and refusals, timeouts, unreachable endpoints, throttling
    (SlowDown, 503) and other passing service failures, at any depth of the chain of
    causes. Permanent: everything else, in particular any error segflow raised on purpose
    (a truncated TIFF, a damaged chunk, a conflict) except :class:`StorageError` or an error
    with a ``cause`` attribute wrapping a transient cause, missing files, denied access and
    a full disk.
    """
    for e in _chain(exc):
        if isinstance(e, SegflowError) and not isinstance(e, StorageError) and not _wrapped(e):
            return False
        if _transient_one(e):
            return True
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed transiently."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


def _brief(e: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, shortened."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not text.startswith(type(e).__name__):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_codec_error(e: BaseException) -> bool:
    if not isinstance(e, RuntimeError | ValueError | TypeError) or isinstance(
        e, json.JSONDecodeError
    ):
        return False
    low = str(e).lower()
    if any(w in low for w in _CODEC_WORDS):
        return True
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if any(m in name for m in _CODEC_MODULES):
            return True
        tb = tb.tb_next
    return False


def translate_storage_error(exc: BaseException, where: str) -> SegflowError | None:
    """One clear segflow error, naming ``where`` (a store, chunk or file), for an exception
    raised by storage; ``None`` when ``exc`` is not a storage failure.

    Covers zarr metadata and codec errors (a broken ``zarr.json``, a damaged chunk),
    fsspec/s3fs/botocore errors (missing bucket or key, credentials, unreachable endpoint,
    throttling) and ``OSError`` (full disk, permissions, missing files, symlink loops). An
    ``OSError`` that names its file is reported with that file. The returned error has
    ``exc`` as its cause, so :func:`is_transient` still sees a transient one.
    """
    if isinstance(exc, SegflowError):
        return exc
    err = _translate_one(exc, str(where))
    if err is not None:
        err.__cause__ = exc
    return err


def _translate_one(exc: BaseException, where: str) -> SegflowError | None:
    chain = list(_chain(exc))
    codes = {c for c in (_s3_code(e) for e in chain) if c}
    names = set().union(*(_names(e) for e in chain))
    text = " ".join(_brief(e) for e in chain).lower()
    oserr = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    filename = getattr(oserr, "filename", None) if oserr is not None else None
    file = str(filename) if filename and not is_remote(where) else where
    no = oserr.errno if oserr is not None else None
    if "NoSuchBucket" in codes or "nosuchbucket" in text or "bucket does not exist" in text:
        bucket = where.split("://", 1)[-1].split("/", 1)[0]
        return StorageAccessError(f"{where}: the S3 bucket '{bucket}' does not exist")
    if (
        codes & _CREDENTIAL_CODES
        or names & _CREDENTIAL_NAMES
        or any(k in text for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "nocredentials"))
    ):
        return StorageAccessError(
            f"{where}: access denied by the storage service (check the credentials)"
        )
    if no in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "no space left on the device" if no == errno.ENOSPC else "disk quota exceeded"
        return StorageError(f"{file}: {what}; free space and run again")
    if no == errno.EROFS:
        return StorageAccessError(f"{file}: the file system is read-only")
    if no == errno.ELOOP:
        return InvalidVolumeError(f"{file}: too many levels of symbolic links (a symlink loop)")
    if no == errno.ENOTDIR:
        return StorageError(f"{file}: a part of the path is a file, not a folder")
    if no == errno.EEXIST:
        return StoreConflictError(f"{file}: already exists (and is not a folder)")
    if isinstance(exc, PermissionError) or no in (errno.EACCES, errno.EPERM):
        if is_remote(where):
            return StorageAccessError(
                f"{where}: access denied by the storage service (check the credentials)"
            )
        return StorageAccessError(f"{file}: permission denied")
    if (
        isinstance(exc, FileNotFoundError)
        or no == errno.ENOENT
        or codes & _NOT_FOUND_CODES
        or names & {"GroupNotFoundError", "ArrayNotFoundError", "NodeNotFoundError"}
    ):
        return VolumeNotFoundError(f"{file}: no such file or store")
    if is_transient(exc):
        return StorageError(f"{where}: the storage could not be reached ({_brief(chain[-1])})")
    if any(isinstance(e, json.JSONDecodeError) for e in chain) or names & {
        "MetadataValidationError",
        "NodeTypeValidationError",
        "UnknownCodecError",
    }:
        return InvalidVolumeError(f"{where}: the zarr metadata is damaged ({_brief(chain[-1])})")
    if any(_is_codec_error(e) for e in chain):
        return InvalidVolumeError(
            f"{where}: stored data cannot be decoded, the chunk is damaged or truncated "
            f"({_brief(chain[-1])})"
        )
    if codes:
        return StorageError(f"{where}: the storage service refused the request ({_brief(exc)})")
    if oserr is not None:
        reason = oserr.strerror or _brief(oserr)
        return StorageError(f"{file}: {reason}")
    return None


def _store_error(url: str, exc: BaseException) -> SegflowError:
    """:func:`translate_storage_error`, or 'cannot open the store' for anything else."""
    return translate_storage_error(exc, url) or InvalidVolumeError(
        f"{url}: cannot open the store ({_brief(exc, 200)})"
    )
