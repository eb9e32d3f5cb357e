"""Where url-mode results are kept: one store interface (store.py), a local folder (local.py, the
default on one machine) behind it.

A result is served from `{base_url}/v1/files/<name>` by the server's files route until
it expires, and its unguessable name is its only credential.
"""

from __future__ import annotations

from clarity.api.results.local import LocalResultStore
from clarity.api.results.store import (
    FILES_ROUTE,
    ResultStore,
    StorageFull,
    StoredResult,
    media_type,
    result_url,
)

__all__ = [
    "FILES_ROUTE", "LocalResultStore", "ResultStore", "StorageFull", "StoredResult", "media_type", "result_url",
]

