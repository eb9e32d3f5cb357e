"""`S3ResultStore`: url-mode results in an S3-compatible bucket, which every replica of a server shares.

`--results s3://bucket/prefix` chooses it. Any S3 API works (AWS, MinIO, Ceph, SeaweedFS, R2):
boto3 finds the endpoint and credentials its usual way (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `~/.aws/config` and
`~/.aws/credentials`, an instance role); Clarity has no options of its own for them.

- **URLs** stay the server's own `/v1/files/<name>`: any replica finds the object in the bucket
  and streams it. Not presigned URLs, because those would point at the storage's endpoint,
  which is often private (a MinIO beside the GPUs) or behind another name than clients use; they
  would carry a signature that dies with temporary credentials, and ignore `--public-url`. So
  the bucket stays private, the URL stays short and stable, and its unguessable name stays its
  only credential, as with the local folder. The cost is that the bytes pass through a replica.
- **Writes** are one PUT, so an object appears whole or not at all, sent with `If-None-Match: *`
  so that no name is ever overwritten (a store that refuses answers 412: `FileExistsError`).
- **Expiry**: an object's `LastModified` is its age. `find` refuses expired results;
  `purge_expired` (on the server's timer, and before saves) lists the prefix and deletes them.
- **Quota**: the sizes of the results under the prefix, listed (expired ones deleted on the way)
  at most every `USAGE_CACHE_SECONDS` per process, plus what the process saved since. Replicas
  writing at once may overshoot it by what they save in that time: a soft limit on the bucket.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from clarity.api.results.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TTL_SECONDS,
    StorageUnavailable,
    StoredResult,
    is_result_name,
    media_type,
    new_name,
    storage_full,
)
from clarity.errors import echo

#: Seconds a listing of the prefix counts as the space results take, before the next check lists again.
USAGE_CACHE_SECONDS = 10.0
#: Keys one DeleteObjects request may name.
_DELETE_BATCH = 1000
#: Bucket names as AWS, MinIO, R2 and SeaweedFS accept them.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
INSTALL_HINT = "S3 storage needs boto3, which is not installed here: pip install -e '.[s3]'"


def require_boto3() -> ModuleType:
    """The `boto3` module; `ImportError` saying how to install it if it is missing."""
    try:
        import boto3
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return boto3


@dataclass(frozen=True)
class S3Location:
    """A bucket, and the key prefix results go under: "" or a path ending in "/"."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> S3Location:
        """`s3://bucket/some/prefix` -> bucket "bucket", prefix "some/prefix/"; a `ValueError` saying what
        is wrong otherwise."""
        parts = urlsplit(text)
        if parts.scheme != "s3" or parts.query or parts.fragment:
            raise ValueError(f"expected s3://BUCKET/PREFIX; got {echo(text)}")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(f"{echo(parts.netloc)} is not a bucket name (3-63 lowercase letters, digits, dots"
                             " and hyphens)")
        prefix = parts.path.strip("/")
        return cls(parts.netloc, f"{prefix}/" if prefix else "")

    def key(self, name: str) -> str:
        """The object key of the result `name`."""
        return self.prefix + name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class S3ResultStore:
    """Results as objects under `location` (`s3://bucket/prefix`), expired after `ttl_seconds`, within
    `max_bytes` (a soft quota: see the module's notes).

    It pickles (runtimes hand it to their workers): each process opens its own boto3 client on first use.
    """

    def __init__(self, location: str | S3Location, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.location = S3Location.parse(location) if isinstance(location, str) else location
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._client: Any = None
        self._listed_at: float | None = None  # time.monotonic() of the last listing
        self._used = 0  # bytes then, plus this process's saves since

    def __reduce__(self) -> tuple[type[S3ResultStore], tuple[S3Location, float, int]]:
        """Pickled as its settings: the client, the lock and the usage seen stay in their process."""
        return S3ResultStore, (self.location, self.ttl_seconds, self.max_bytes)

    def check_access(self) -> None:
        """Raise `StorageUnavailable` unless the bucket answers with these credentials (checked at start)."""
        with self._errors("cannot use"):
            self._s3().head_bucket(Bucket=self.location.bucket)

    def save(self, data: bytes, extension: str) -> str:
        """Store `data` as one object with a conditional PUT; return its name."""
        name = new_name(extension)
        self._check_room(len(data))
        s3 = self._s3()
        with self._errors("cannot save a result in"):
            try:
                s3.put_object(Bucket=self.location.bucket, Key=self.location.key(name), Body=data,
                              ContentType=media_type(name), IfNoneMatch="*")
            except s3.exceptions.ClientError as error:
                if error_status(error) == 412:
                    raise FileExistsError(f"{self.location.key(name)} already exists in {self.location}") from None
                raise
        with self._lock:
            self._used += len(data)
        return name

    def find(self, name: str) -> StoredResult | None:
        """The unexpired result `name`, its body open for streaming; None if there is none (expired objects
        are left to `purge_expired`)."""
        if not is_result_name(name):
            return None
        s3 = self._s3()
        with self._errors("cannot read a result from"):
            try:
                answer = s3.get_object(Bucket=self.location.bucket, Key=self.location.key(name))
            except s3.exceptions.ClientError as error:
                if error_status(error) == 404:
                    return None
                raise
        if time.time() - answer["LastModified"].timestamp() > self.ttl_seconds:
            answer["Body"].close()
            return None
        return StoredResult(answer["Body"], answer["ContentLength"])

    def check_room(self) -> None:
        self._check_room(0)

    def purge_expired(self) -> int:
        """Delete the expired results under the prefix (nothing else); return how many."""
        removed, _ = self._purge()
        return removed

    def _check_room(self, size: int) -> None:
        """`StorageFull` unless `size` more bytes fit; with 0, unless the results are below the quota."""
        with self._lock:
            fresh = self._listed_at is not None and time.monotonic() - self._listed_at < USAGE_CACHE_SECONDS
            used = self._used
        if not fresh:
            _, used = self._purge()
        if used + size > self.max_bytes or used >= self.max_bytes:
            raise storage_full(used, self.max_bytes, self.ttl_seconds)

    def _purge(self) -> tuple[int, int]:
        """Delete expired results; return how many, and the bytes the others take (one listing)."""
        cutoff = time.time() - self.ttl_seconds
        expired: list[str] = []
        kept = 0
        for item in self._results():
            if item["LastModified"].timestamp() < cutoff:
                expired.append(item["Key"])
            else:
                kept += item["Size"]
        self._delete(expired)
        with self._lock:
            self._listed_at, self._used = time.monotonic(), kept
        return len(expired), kept

    def _results(self) -> Iterator[dict[str, Any]]:
        """The listing entries of the results directly under the prefix (keys this store names, nothing else)."""
        pages = self._s3().get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=self.location.prefix, Delimiter="/")
        with self._errors("cannot list the results in"):
            for page in pages:
                for item in page.get("Contents", []):
                    if is_result_name(item["Key"][len(self.location.prefix):]):
                        yield item

    def _delete(self, keys: list[str]) -> None:
        """Delete `keys`, a batch per request; `StorageUnavailable` naming the first that could not be."""
        s3 = self._s3()
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + _DELETE_BATCH]]
            with self._errors("cannot delete expired results from"):
                answer = s3.delete_objects(Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageUnavailable(f"cannot delete {first.get('Key')} from {self.location}: {first.get('Code')}"
                                         f" {first.get('Message')} ({len(answer['Errors'])} keys failed)")

    def _s3(self) -> Any:
        """This process's S3 client, made on first use from boto3's environment and config files."""
        with self._lock:
            if self._client is None:
                self._client = require_boto3().session.Session().client("s3")
            return self._client

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Raise boto3's failures (unreachable endpoint, refused credentials, missing bucket) as
        `StorageUnavailable`, saying what was being done, where."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as error:
            endpoint = self._client.meta.endpoint_url if self._client is not None else "unknown"
            raise StorageUnavailable(f"{doing} {self.location} (endpoint {endpoint}): {error}") from error


def error_status(error: Any) -> int | None:
    """The HTTP status of a boto3 `ClientError`."""
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
