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
import stat
import tempfile
import time
from pathlib import Path
from typing import Protocol

from clarity.imageio import OUTPUT_FORMATS

#: How long a result stays downloadable, like OpenAI's one-hour image URLs.
DEFAULT_TTL_SECONDS = 3600
#: Disk space results may take (2 GB).
DEFAULT_MAX_BYTES = 2_000_000_000
#: URL path prefix the files are served under.
FILES_ROUTE = "/v1/files"

# 32 random bytes in URL-safe base64 (43 characters), then a known extension: nothing else is
# ever looked up, so a request cannot walk out of the folder.
_NAME = re.compile(r"^[A-Za-z0-9_-]{43}\.(" + "|".join(OUTPUT_FORMATS) + r")$")


class StorageFull(Exception):
    """The store has no room for a result until older ones expire; the message says how full it is."""


class ResultStore(Protocol):
    """Keeps encoded results for url mode until they expire, within a size quota."""

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` (an image in the output format `extension`); return its unguessable name.
        Raises `StorageFull` when it does not fit."""

    def find(self, name: str) -> Path | None:
        """The stored result called `name`, or None if it does not exist or has expired."""

    def check_room(self) -> None:
        """Raise `StorageFull` if the store is full now (checked before work that will save)."""

    def purge_expired(self) -> int:
        """Delete expired results; return how many (run on a timer, and before a save)."""


def result_url(base_url: str, name: str) -> str:
    """Where a client downloads the stored result `name`."""
    return f"{base_url}{FILES_ROUTE}/{name}"


def media_type(name: str) -> str:
    """The Content-Type of a stored result, from its extension."""
    return OUTPUT_FORMATS[name.rsplit(".", 1)[-1]].media_type


class LocalResultStore:
    """Write results atomically under unguessable names in a folder; find them again until they expire.

    At most `max_bytes` of results are kept: expired ones are deleted first, and beyond that a
    save raises `StorageFull` (the folder is never filled by a burst of url-mode requests).
    """

    def __init__(
        self, folder: str | Path, ttl_seconds: float = DEFAULT_TTL_SECONDS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.folder = Path(folder)
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` and return its file name (the token plus `.extension`)."""
        if extension not in OUTPUT_FORMATS:
            raise ValueError(f"unsupported extension {extension!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_room(len(data))
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

    def check_room(self) -> None:
        self._check_room(0)

    def _check_room(self, size: int) -> None:
        """Delete expired results, then `StorageFull` unless `size` more bytes fit; with 0, unless the
        store is below its quota."""
        _, used = self._purge()
        if used + size > self.max_bytes or used >= self.max_bytes:
            raise StorageFull(
                f"The server's storage for url-mode results is full ({used / 1e6:.0f} of {self.max_bytes / 1e6:.0f}"
                f" MB) until older results expire (after {self.ttl_seconds:g} s); retry later, or ask for"
                " response_format=b64_json."
            )

    def find(self, name: str) -> Path | None:
        """The path of a stored, unexpired result, or None: also for names that are not tokens, and
        for anything but a regular file (a link placed in the folder is never followed)."""
        if not _NAME.match(name):
            return None
        path = self.folder / name
        try:
            status = path.lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(status.st_mode):
            return None
        if time.time() - status.st_mtime > self.ttl_seconds:
            path.unlink(missing_ok=True)
            return None
        return path

    def purge_expired(self) -> int:
        """Delete expired results (and partial writes left by a crash); return how many.

        Only files this store names are touched, so sharing the folder with anything else is safe.
        """
        removed, _ = self._purge()
        return removed

    def _purge(self) -> tuple[int, int]:
        """Delete expired files; return how many, and the bytes the others take (one pass over the folder)."""
        removed = kept = 0
        cutoff = time.time() - self.ttl_seconds
        for path in self._own_files():
            try:
                status = path.lstat()
                if status.st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
                else:
                    kept += status.st_size
            except FileNotFoundError:
                continue  # another process removed it first
        return removed, kept

    def _own_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [path for path in self.folder.iterdir() if _NAME.match(path.name) or path.name.startswith(".partial-")]
