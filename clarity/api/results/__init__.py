"""Where url-mode results are kept: one store interface (store.py), a local folder (local.py, the
default on one machine) or an S3-compatible bucket (s3.py, shared by replicas) behind it.

Either way a result is served from `{base_url}/v1/files/<name>` by the server's files route until
it expires, and its unguessable name is its only credential.
"""

from __future__ import annotations

from pathlib import Path

from clarity.api.results.local import LocalResultStore
from clarity.api.results.s3 import S3ResultStore
from clarity.api.results.store import (
    FILES_ROUTE,
    ResultStore,
    StorageFull,
    StorageUnavailable,
    StoredResult,
    media_type,
    result_url,
)
from clarity.errors import ParamError

__all__ = [
    "FILES_ROUTE", "LocalResultStore", "ResultStore", "S3ResultStore", "StorageFull",
    "StorageUnavailable", "StoredResult", "media_type", "open_result_store", "result_url",
]


def open_result_store(location: str | None, folder: Path, ttl_seconds: float, max_bytes: int) -> ResultStore:
    """The store a server's options ask for: the bucket and prefix of `location` (`--results s3://...`) when
    given, else `folder`. A bucket is checked now, so that a wrong endpoint, bucket or key stops the server
    at start (a `ParamError` naming `results`), not its first url-mode request."""
    if location is None:
        return LocalResultStore(folder, ttl_seconds, max_bytes)
    store = S3ResultStore(location, ttl_seconds, max_bytes)
    try:
        store.check_access()
    except OSError as error:
        raise ParamError("results", str(error)) from None
    return store
