"""What every url-mode result store is: its interface, the names it gives results, and what a reader gets.

A result is saved under an unguessable name (32 random bytes, then the output format's
extension) and served from `{base_url}/v1/files/<name>` until it expires. The name is the token
(which is why it must be unguessable and why it is the only thing checked), so a browser or an
`<img>` can fetch it without a key, as with OpenAI's own image URLs.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Protocol

from clarity.imageio import OUTPUT_FORMATS

#: How long a result stays downloadable, like OpenAI's one-hour image URLs.
DEFAULT_TTL_SECONDS = 3600
#: Space results may take (2 GB).
DEFAULT_MAX_BYTES = 2_000_000_000
#: URL path prefix the files are served under.
FILES_ROUTE = "/v1/files"
#: Bytes read at a time when a result is served.
CHUNK_BYTES = 256 * 1024

# 32 random bytes in URL-safe base64 (43 characters), then a known extension: nothing else is
# ever looked up, so a request cannot walk out of the folder or the bucket's prefix.
_NAME = re.compile(r"[A-Za-z0-9_-]{43}\.(" + "|".join(OUTPUT_FORMATS) + r")")


class StorageFull(Exception):
    """The store has no room for a result until older ones expire; the message says how full it is."""


class StorageUnavailable(OSError):
    """The store could not be reached, or refused a request; the message names where (for the log only)."""


def storage_full(used: int, max_bytes: int, ttl_seconds: float) -> StorageFull:
    """The `StorageFull` a store raises when `used` bytes leave no room under its quota of `max_bytes`."""
    return StorageFull(
        f"The server's storage for url-mode results is full ({used / 1e6:.0f} of {max_bytes / 1e6:.0f}"
        f" MB) until older results expire (after {ttl_seconds:g} s); retry later, or ask for"
        " response_format=b64_json."
    )


class Readable(Protocol):
    """A binary stream a stored result is read from: an open file, or an S3 object's body."""

    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


class StoredResult:
    """A stored result, open for reading: its size in bytes and its contents, read once.

    It is opened when found, so a result that expires or is purged meanwhile is still served
    whole to the client that found it. Read it with `chunks()` or `read_bytes()`, which close it.
    """

    def __init__(self, body: Readable, size: int) -> None:
        self.body = body
        self.size = size

    def chunks(self) -> Iterator[bytes]:
        """The contents, `CHUNK_BYTES` at a time; closed at the end (or when the iterator is closed)."""
        try:
            while chunk := self.body.read(CHUNK_BYTES):
                yield chunk
        finally:
            self.body.close()

    def read_bytes(self) -> bytes:
        """The whole contents."""
        return b"".join(self.chunks())


class ResultStore(Protocol):
    """Keeps encoded results for url mode until they expire, within a size quota.

    A store that cannot reach its storage raises `OSError` (the timer that purges retries later).
    """

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` (an image in the output format `extension`) whole or not at all; return its
        unguessable name. Raises `StorageFull` when it does not fit."""

    def find(self, name: str) -> StoredResult | None:
        """The stored result called `name`, open for reading; None if it does not exist, has expired,
        or `name` is not one this store gives."""

    def check_room(self) -> None:
        """Raise `StorageFull` if the store is full now (checked before work that will save)."""

    def purge_expired(self) -> int:
        """Delete expired results; return how many (run on a timer, and before a save)."""


def new_name(extension: str) -> str:
    """A fresh unguessable name for a result in the output format `extension`."""
    if extension not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported extension {extension!r}")
    return f"{secrets.token_urlsafe(32)}.{extension}"


def is_result_name(name: str) -> bool:
    """Whether `name` is one `new_name` could have given (the only names a store looks up)."""
    return _NAME.fullmatch(name) is not None


def result_url(base_url: str, name: str) -> str:
    """Where a client downloads the stored result `name`."""
    return f"{base_url}{FILES_ROUTE}/{name}"


def media_type(name: str) -> str:
    """The Content-Type of a stored result, from its extension."""
    return OUTPUT_FORMATS[name.rsplit(".", 1)[-1]].media_type
