"""`LocalResultStore`: url-mode results in a folder of this machine (the default).

Inference workers (separate processes) write, the HTTP process serves; they share nothing but
the folder, so everything a reader needs is in the file system, and a file's modification time
is its age.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

from clarity.api.results.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TTL_SECONDS,
    StoredResult,
    is_result_name,
    new_name,
    storage_full,
)

#: Temporary files a save writes before renaming them into place.
_PARTIAL = ".partial-"


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
        name = new_name(extension)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_room(len(data))
        # Written to a temporary name in the same folder and renamed, so a reader never sees
        # half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=_PARTIAL)
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
            raise storage_full(used, self.max_bytes, self.ttl_seconds)

    def find(self, name: str) -> StoredResult | None:
        """The stored, unexpired result, open for reading, or None: also for names that are not tokens,
        and for anything but a regular file (a link placed in the folder is never followed)."""
        if not is_result_name(name):
            return None
        path = self.folder / name
        try:
            # Not following links, and not waiting on a FIFO: what is opened is checked before it is read.
            handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # not there, or a link
            return None
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            os.close(handle)
            return None
        if time.time() - status.st_mtime > self.ttl_seconds:
            os.close(handle)
            path.unlink(missing_ok=True)
            return None
        return StoredResult(os.fdopen(handle, "rb"), status.st_size)

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
        return [path for path in self.folder.iterdir() if is_result_name(path.name) or path.name.startswith(_PARTIAL)]
