"""Where a cluster batch reads its inputs and commits its results: local folders or `s3://` prefixes.

A place is written as text, the same on the driver and on every node: a local path (which must be
the same on every node: a shared filesystem) or `s3://BUCKET/PREFIX` (boto3 finds the endpoint and
credentials its usual way). Committing a result is atomic and never overwrites:

- **S3**: one PUT with `If-None-Match: *`. The object appearing is the commit; a second PUT of the
  same key is refused (412), so a result can never be written twice.
- **Local**: the bytes go to a temporary file beside the target, which is then hard-linked to the
  target's name (refused if the name exists) and removed; where the filesystem has no hard links,
  it is renamed instead (atomic, but a later attempt would replace the earlier one).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from clarity.api.results.s3 import S3Location, error_status, require_boto3
from clarity.errors import ParamError

#: Inputs taken from a folder or prefix (anything else there is left alone); as for a local batch.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})
S3_SCHEME = "s3://"
#: The temporary files of local commits: `.NAME.<attempt>.partial` beside the result.
PARTIAL_SUFFIX = ".partial"

_clients: dict[int, Any] = {}  # this process's S3 client (boto3 clients are thread-safe)


def is_s3(place: str) -> bool:
    return place.startswith(S3_SCHEME)


def s3_client() -> Any:
    """This process's boto3 S3 client, made on first use from boto3's environment and config files."""
    if os.getpid() not in _clients:
        _clients[os.getpid()] = require_boto3().session.Session().client("s3")
    return _clients[os.getpid()]


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b.png` -> ("bucket", "a/b.png"); a `ParamError` naming `input` for a bad URL."""
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    try:
        S3Location.parse(f"{S3_SCHEME}{bucket}")
    except ValueError as error:
        raise ParamError("input", str(error)) from None
    return bucket, key


@dataclass(frozen=True)
class Item:
    """One image of the batch: read `source`, commit the result to `target` (both places as text)."""

    source: str
    target: str


def list_sources(inputs: list[str]) -> list[str]:
    """Every input image: files and `s3://` objects as given, and the images directly inside each local
    folder or `s3://` prefix (sorted by name). A `ParamError` naming `input` for a folder without images."""
    sources: list[str] = []
    for place in inputs:
        if is_s3(place):
            found = [place] if _has_image_suffix(place) else _list_s3(place)
        elif Path(place).is_dir():
            found = sorted(str(p.resolve()) for p in Path(place).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = [str(Path(place).resolve())]  # a missing file fails on its own, not the batch
        if not found:
            raise ParamError("input", f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {place}")
        sources += found
    return sources


def plan_items(sources: list[str], output: str, output_format: str) -> list[Item]:
    """Each source with its target, `OUTPUT/<source stem>.<output_format>`; a `ParamError` naming `input`
    when two sources would share a target."""
    output = output if is_s3(output) else str(Path(output).resolve())
    items: dict[str, Item] = {}
    for source in sources:
        target = join(output, f"{PurePosixPath(source).stem}.{output_format}")
        if target in items:
            raise ParamError("input", f"{items[target].source} and {source} would both be written to {target};"
                             " rename one")
        items[target] = Item(source, target)
    return list(items.values())


def join(folder: str, name: str) -> str:
    """The place `name` inside the folder or prefix `folder`."""
    if is_s3(folder):
        return f"{folder.rstrip('/')}/{name}"
    return str(Path(folder) / name)


def existing(targets: list[str]) -> set[str]:
    """Those of `targets` that exist already (one listing per S3 prefix, one `stat` per local file)."""
    found: set[str] = set()
    prefixes = {target.rsplit("/", 1)[0] + "/" for target in targets if is_s3(target)}
    for prefix in prefixes:
        bucket, key = split_s3(prefix)
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
        found |= {f"{S3_SCHEME}{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", [])}
    found |= {target for target in targets if not is_s3(target) and Path(target).exists()}
    return found & set(targets)


def read(source: str) -> bytes:
    """The bytes of an input file or object."""
    if is_s3(source):
        bucket, key = split_s3(source)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(source).read_bytes()


def exists(target: str) -> bool:
    """Whether a result is committed at `target`."""
    if not is_s3(target):
        return Path(target).exists()
    bucket, key = split_s3(target)
    client = s3_client()
    try:
        client.head_object(Bucket=bucket, Key=key)
    except client.exceptions.ClientError as error:
        if error_status(error) == 404:
            return False
        raise
    return True


def commit(target: str, data: bytes) -> bool:
    """Write `data` at `target` whole or not at all, never over an existing result: True if written, False
    if a result was there already (an earlier attempt of the same image committed it)."""
    if is_s3(target):
        return _put_if_absent(target, data)
    return _link_if_absent(Path(target), data)


def _put_if_absent(target: str, data: bytes) -> bool:
    bucket, key = split_s3(target)
    client = s3_client()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except client.exceptions.ClientError as error:
        if error_status(error) == 412:
            return False
        raise
    return True


def _link_if_absent(target: Path, data: bytes) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
    try:
        partial.write_bytes(data)
        try:
            os.link(partial, target)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            os.replace(partial, target)
        return True
    finally:
        partial.unlink(missing_ok=True)


def remove_partials(targets: list[str]) -> int:
    """Delete the temporary files that attempts killed mid-write left beside local `targets`; how many."""
    removed = 0
    for target in targets:
        if not is_s3(target):
            for partial in Path(target).parent.glob(f".{Path(target).name}.*{PARTIAL_SUFFIX}"):
                partial.unlink(missing_ok=True)
                removed += 1
    return removed


def _has_image_suffix(url: str) -> bool:
    return PurePosixPath(url).suffix.lower() in IMAGE_SUFFIXES


def _list_s3(prefix_url: str) -> list[str]:
    """The image objects directly under an `s3://` prefix, sorted by key."""
    bucket, key = split_s3(prefix_url)
    key = f"{key.rstrip('/')}/" if key.strip("/") else ""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
    keys = sorted(item["Key"] for page in pages for item in page.get("Contents", []))
    return [f"{S3_SCHEME}{bucket}/{k}" for k in keys if _has_image_suffix(k)]
