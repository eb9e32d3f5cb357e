"""Where url-mode results are kept: a small store interface, and a local folder behind it.

A result is saved under an unguessable name and served from `{base_url}/v1/files/<name>` until
it expires. The name is the token (which is why it must be unguessable and why it is the only
thing checked), so a browser or an `<img>` can fetch it without a key, as with OpenAI's own
image URLs.

`LocalResultStore`: inference workers (separate processes) write, the HTTP process serves;
they share nothing but the folder, so everything a reader needs is in the file system, and a
file's modification time is its age.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Protocol

from clarity.imageio import OUTPUT_FORMATS

#: How long a result stays downloadable, like OpenAI's one-hour image URLs.
DEFAULT_TTL_SECONDS = 3600
#: URL path prefix the files are served under.
FILES_ROUTE = "/v1/files"

# 32 random bytes in URL-safe base64 (43 characters), then a known extension: nothing else is
# ever looked up, so a request cannot walk out of the folder.
_NAME = re.compile(r"^[A-Za-z0-9_-]{43}\.(" + "|".join(OUTPUT_FORMATS) + r")$")


class ResultStore(Protocol):
    """Keeps encoded results for url mode until they expire."""

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` (an image in the output format `extension`); return its unguessable name."""

    def find(self, name: str) -> Path | None:
        """The stored result called `name`, or None if it does not exist or has expired."""


def result_url(base_url: str, name: str) -> str:
    """Where a client downloads the stored result `name`."""
    return f"{base_url}{FILES_ROUTE}/{name}"


def media_type(name: str) -> str:
    """The Content-Type of a stored result, from its extension."""
    return OUTPUT_FORMATS[name.rsplit(".", 1)[-1]].media_type


class LocalResultStore:
    """Write results atomically under unguessable names in a folder; find them again until they expire."""

    def __init__(self, folder: str | Path, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self.folder = Path(folder)
        self.ttl_seconds = ttl_seconds

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` and return its file name (the token plus `.extension`)."""
        if extension not in OUTPUT_FORMATS:
            raise ValueError(f"unsupported extension {extension!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.purge_expired()
        name = f"{secrets.token_urlsafe(32)}.{extension}"
        # Written to a temporary name in the same folder and renamed, so a reader never sees
        # half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, self.folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return name

    def find(self, name: str) -> Path | None:
        """The path of a stored, unexpired file, or None (also for names that are not tokens)."""
        if not _NAME.match(name):
            return None
        path = self.folder / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.ttl_seconds:
            path.unlink(missing_ok=True)
            return None
        return path

    def purge_expired(self) -> int:
        """Delete expired results (and partial writes left by a crash); return how many.

        Only files this store names are touched, so sharing the folder with anything else is safe.
        """
        removed = 0
        cutoff = time.time() - self.ttl_seconds
        for path in self.folder.glob("*"):
            if not (_NAME.match(path.name) or path.name.startswith(".partial-")):
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue  # another worker removed it first
        return removed
