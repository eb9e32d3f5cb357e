"""The Ray Data actor of a cluster batch: the model loaded once, then one row in, one row out per image.

Each output row says what became of its image, so that a failing image never fails the job: `status`
is `written` (this attempt committed the result), `exists` (a result was committed already when this
attempt reached the image, or committed by another attempt first: work redone after a lost node or
driver, never written twice) or `failed` (with `error`, the reason). `node` is the IP of the node that
did it and `seconds` its time there, for the per-node throughput of the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clarity.errors import ClarityError
from clarity.params import UpscaleParams
from clarity.serving.ray import batch_storage

WRITTEN, EXISTS, FAILED = "written", "exists", "failed"
#: The columns of an output row.
COLUMNS = ("source", "target", "status", "error", "node", "seconds", "size")


@dataclass(frozen=True)
class ModelSpec:
    """What every actor loads and how it encodes: the same meaning as `clarity upscale`'s flags."""

    weights: Path
    model: str | None
    device: str
    speed: Any  # clarity.SpeedOptions
    params: UpscaleParams
    output_format: str
    quality: int | None
    mask: bytes | None


class BatchUpscaler:
    """A Ray Data actor: `Upscaler.from_pretrained` once, then `__call__` upscales a batch of rows."""

    def __init__(self, spec: ModelSpec) -> None:
        import ray

        from clarity import Upscaler
        from clarity.models.catalogue import Catalogue, upscaler_kwargs

        catalogue = Catalogue.discover(spec.weights)
        model_id = catalogue.model_id(spec.model)
        self.upscaler = Upscaler.from_pretrained(**upscaler_kwargs(catalogue, model_id), device=spec.device,
                                                 speed=spec.speed)
        self.spec = spec
        self.node = ray.util.get_node_ip_address()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One output row per input row (`source`, `target`), in `COLUMNS`."""
        rows = [self.upscale_one(str(source), str(target)) for source, target in zip(batch["source"],
                                                                                     batch["target"], strict=True)]
        return {column: np.array([row[column] for row in rows], dtype=object) for column in COLUMNS}

    def upscale_one(self, source: str, target: str) -> dict[str, Any]:
        """Upscale `source` and commit it at `target`; the row saying what happened (never raises for the
        image's own faults: an unreadable file, a refused parameter, a storage error)."""
        started = time.perf_counter()
        row: dict[str, Any] = {"source": source, "target": target, "status": FAILED, "error": "", "node": self.node,
                               "size": ""}
        try:
            if batch_storage.exists(target):  # committed by an earlier attempt: no work to redo
                row["status"] = EXISTS
            else:
                data, size = self._encode(batch_storage.read(source))
                row["status"] = WRITTEN if batch_storage.commit(target, data) else EXISTS
                row["size"] = size
        except Exception as error:  # one bad image must not cost the rest of the batch
            known = isinstance(error, ClarityError)
            row["error"] = str(error) if known else f"{type(error).__name__}: {error}"
        row["seconds"] = round(time.perf_counter() - started, 3)
        return row

    def _encode(self, image: bytes) -> tuple[bytes, str]:
        """The upscaled, encoded result of `image`, and its size as WIDTHxHEIGHT."""
        from clarity.imageio import encode_image

        spec = self.spec
        result = self.upscaler.upscale(image, spec.params, mask=spec.mask)
        encoded = encode_image(result.image, spec.output_format, spec.quality)
        return encoded, f"{result.image.width}x{result.image.height}"
