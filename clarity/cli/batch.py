"""Which result file each input of `clarity upscale` goes to, and writing results safely.

Pure file-system planning, no models: one input and an output file name, or any number of
image files and folders and an output folder, where each result is named after its input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clarity.errors import ParamError
from clarity.imageio import check_output_format

#: File name extensions taken from an input folder (other files there are left alone).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"})


@dataclass(frozen=True)
class Job:
    """One upscale: read `source`, write the result to `target` in `output_format`."""

    source: Path
    target: Path
    output_format: str


def plan_jobs(inputs: Sequence[Path], output: Path, folder_format: str = "png") -> list[Job]:
    """The jobs for `clarity upscale INPUT... -o OUTPUT`.

    One input file and an `output` with an image extension (that is not an existing folder):
    one job, in the format of that extension. Otherwise `output` is a folder and every input
    file, and every image directly inside an input folder (sorted by name), gets
    `<output>/<input stem>.<folder_format>`. Raises `ParamError` naming `output` or `input`
    when that cannot work, before any image is read.
    """
    folder_format = check_output_format(folder_format, "format")
    single_file = len(inputs) == 1 and not inputs[0].is_dir() and not output.is_dir()
    if single_file and output.suffix:
        return [Job(inputs[0], output, check_output_format(output.suffix.lstrip("."), "output"))]
    if output.exists() and not output.is_dir():
        raise ParamError("output", f"{output} is a file; with several inputs or a folder, give an output folder")

    sources: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ParamError("input", f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
            sources += found
        else:
            sources.append(path)  # a missing or unreadable file fails on its own, not the batch
    jobs: dict[Path, Job] = {}
    for source in sources:
        target = output / f"{source.stem}.{folder_format}"
        if target.resolve() == source.resolve():
            raise ParamError("output", f"the result for {source} would replace it; choose another output folder")
        if target in jobs:
            raise ParamError(
                "input", f"{jobs[target].source} and {source} would both be written to {target}; rename one"
            )
        jobs[target] = Job(source, target, folder_format)
    return list(jobs.values())


def write_atomically(target: Path, data: bytes) -> None:
    """Write `data` to `target` so that `target` is either absent or whole, never half-written.

    An interrupted batch is resumed by skipping the results that exist, so a partial file
    must never carry the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
