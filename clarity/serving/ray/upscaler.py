"""The upscaler deployment: one replica per GPU (or per unit of the configured resource), every served
model loaded, each edit run through the API core's handler (parse -> run -> respond).

`server.py` makes it a Ray Serve deployment with the cluster's options (resources, replicas or
autoscaling, `max_ongoing_requests`, `max_queued_requests`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from starlette.datastructures import FormData

from clarity.api import metrics
from clarity.api.errors import APIError, queue_timeout
from clarity.api.handler import EditHandler
from clarity.api.logs import configure_logging
from clarity.serving.ray.calls import Answer, EditCall, read_form
from clarity.serving.ray.metrics import install as install_metrics

logger = logging.getLogger(__name__)


class UpscalerReplica:
    """Holds `handler` with every served model loaded on `device` ("cuda" or "cpu"), and runs edits on it.

    The edit runs in a thread, so that the replica's event loop stays free to hear Ray's cancellation
    (the client disconnected): the handler then stops after its current denoising step.
    """

    def __init__(self, handler: EditHandler, device: str) -> None:
        configure_logging(handler.config.log_level)  # a Ray worker starts with Python's defaults
        install_metrics()  # before loading: the model loads are counted
        handler.load(device)
        self.handler = handler

    async def edit(self, call: EditCall) -> Answer:
        """The answer to one edit: the `ImagesResponse`, or the API core's error for it; a 504 `queue_timeout`,
        without running it, if it waited for a replica longer than `--queue-timeout` since its body was in."""
        waited = time.time() - call.received_at  # the ingress's clock and this node's: NTP keeps them together
        if waited > self.handler.config.queue_timeout:
            logger.info("request %s: not started, it waited %.1f s for a replica", call.request_id, waited)
            metrics.record_queue_timeout()
            return Answer.of(queue_timeout(waited, self.handler.config.queue_timeout))
        try:
            form = await read_form(call)
        except APIError as error:
            return Answer.of(error)
        try:
            return await self._run_in_thread(call, form)
        finally:
            await form.close()

    async def _run_in_thread(self, call: EditCall, form: FormData) -> Answer:
        cancelled = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(None, self._edit, call, form, cancelled.is_set)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # Ray cancels the call when its client has gone. The thread stops after its current step;
            # waiting for it keeps the replica from starting another edit beside it meanwhile.
            cancelled.set()
            await asyncio.wait([work])
            raise

    def _edit(self, call: EditCall, form: FormData, cancelled: Callable[[], bool]) -> Answer:
        handler = self.handler
        try:
            request = handler.parse(form.multi_items(), call.request_id, call.base_url, call.received_at, call.job_id)
            result = handler.run(request, cancelled=cancelled)
            return Answer(200, handler.respond(request, result))
        except APIError as error:
            return Answer.of(error)
