"""What a running job tells its watchers, from the worker that runs it: progress and partial images.

Called from the engine's progress callback after every denoising step, so it stays cheap: the
share done is written at most every `PROGRESS_INTERVAL` seconds, and a partial image (the engine's
preview of the denoised estimate, `ProgressEvent.preview`) is made only at the `partial_images`
evenly spaced points of the work the client asked for.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING

from clarity.api.jobs import JobStore
from clarity.imageio import encode_image

if TYPE_CHECKING:
    from clarity import ProgressEvent

#: Seconds between two progress writes of one job.
PROGRESS_INTERVAL = 0.25


class JobProgress:
    """Reports the upscale of job `job_id` into `store`; `partial_images` previews, encoded like the result."""

    def __init__(self, store: JobStore, job_id: str, partial_images: int, output_format: str,
                 output_compression: int | None) -> None:
        self.store = store
        self.job_id = job_id
        self.partial_images = partial_images
        self.output_format = output_format
        self.output_compression = output_compression
        self.previews_sent = 0
        self._last_write = -float("inf")

    def cancelled(self) -> bool:
        """Whether the job was cancelled (or deleted) since it started."""
        return self.store.cancel_requested(self.job_id)

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL or event.fraction >= 1:
            self._last_write = now
            self.store.report_progress(self.job_id, event.fraction)
        if self._preview_due(event.fraction) and event.preview is not None:
            self._send_preview(event)

    def _preview_due(self, fraction: float) -> bool:
        """Previews are due at 1/(n+1), 2/(n+1), ... n/(n+1) of the work, for n = `partial_images`."""
        if self.previews_sent >= self.partial_images:
            return False
        return fraction >= (self.previews_sent + 1) / (self.partial_images + 1)

    def _send_preview(self, event: ProgressEvent) -> None:
        image = event.preview()
        encoded = encode_image(image, self.output_format, self.output_compression)
        self.store.add_event(self.job_id, "partial_image", {
            "b64_json": base64.b64encode(encoded).decode("ascii"),
            "partial_image_index": self.previews_sent,
            "size": f"{image.width}x{image.height}",
            "output_format": self.output_format,
            "progress": round(event.fraction, 4),
        })
        self.previews_sent += 1
