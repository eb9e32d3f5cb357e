"""The LitAPI behind `POST /v1/images/edits`: decode, call the API core's handler, encode.

LitServe runs `setup`, `decode_request`, `predict` and `encode_response` in spawned inference
workers. Only an `HTTPException` crosses back to the client intact (status and detail; its
headers are dropped and restored by the app's error handler), so every `APIError` of the
handler leaves as one.
"""

from __future__ import annotations

import logging
from typing import Any

import litserve as ls
from fastapi import HTTPException

from clarity.api import metrics, wire
from clarity.api.errors import APIError
from clarity.api.handler import EditHandler, client_gone
from clarity.api.logs import configure_logging
from clarity.serving.litserve.patches import split_tags
from clarity.serving.litserve.queue import CancelRegistry
from clarity.serving.litserve.signals import settle_worker_signals

logger = logging.getLogger(__name__)


def http_error(error: APIError) -> HTTPException:
    """The exception LitServe carries from a worker to the client."""
    return HTTPException(status_code=error.status, detail=error.body)


class EditsLitAPI(ls.LitAPI):
    """OpenAI-compatible image edits: the handler's steps, in LitServe's hooks.

    `cancellations` holds the ids of requests whose clients disconnected (marked by the HTTP
    process, read here). Everything passed in must pickle: workers are spawned processes.
    """

    #: Whether workers ignore SIGINT and SIGTERM: set by `SupervisedLitServer.run`, whose main
    #: process decides when they stop (signals.py), before they are spawned.
    ignore_stop_signals = False

    def __init__(self, handler: EditHandler, cancellations: CancelRegistry) -> None:
        super().__init__(api_path=wire.EDITS_PATH)
        self.handler = handler
        self.cancellations = cancellations

    def setup(self, device: str) -> None:
        settle_worker_signals(ignore=self.ignore_stop_signals)  # first: they are blocked until then
        configure_logging(self.handler.config.log_level)  # a spawned worker starts with Python's defaults
        self.handler.load(device)

    # `request` stays unannotated: LitServe reads the annotation as the endpoint's request type
    # (a starlette Request), and hands this method the parsed multipart form.
    def decode_request(self, request) -> wire.EditRequest:
        tags, items = split_tags(request.multi_items())
        try:
            if self.cancellations.is_cancelled(tags.request_id):
                logger.warning("request %s skipped: its client disconnected while it was queued", tags.request_id)
                metrics.record_cancelled("queued")
                raise client_gone()
            return self.handler.parse(items, tags.request_id, tags.base_url, tags.received_at, tags.job_id)
        except APIError as error:
            raise http_error(error) from None

    def predict(self, request: wire.EditRequest) -> tuple[wire.EditRequest, Any]:
        try:
            result = self.handler.run(request, cancelled=lambda: self.cancellations.is_cancelled(request.request_id))
            return request, result
        except APIError as error:
            raise http_error(error) from None

    def encode_response(self, output: tuple[wire.EditRequest, Any]) -> dict[str, Any]:
        try:
            return self.handler.respond(*output)
        except APIError as error:
            raise http_error(error) from None
