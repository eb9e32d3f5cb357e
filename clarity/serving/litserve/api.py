"""The LitAPI behind `POST /v1/images/edits`: form -> `UpscaleParams` -> engine -> OpenAI JSON.

LitServe runs `setup`, `decode_request`, `predict` and `encode_response` in spawned inference
workers. Only an `HTTPException` crosses back to the client intact (status and detail), so
every expected failure is raised as one, with an OpenAI-shaped error as its detail.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import litserve as ls
from fastapi import HTTPException

from clarity.engine.acceleration import SpeedOptions
from clarity.errors import ContentPolicyError, ParamError
from clarity.imageio import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS, encode_image
from clarity.serving import openai
from clarity.serving.cancellation import REQUEST_ID_FIELD, CancelRegistry
from clarity.serving.files import FILES_ROUTE, FileStore
from clarity.serving.logs import DEFAULT_PROGRESS_SECONDS, RequestLog, configure_logging

if TYPE_CHECKING:
    from clarity import Upscaler
    from clarity.models.catalogue import Catalogue

logger = logging.getLogger(__name__)


class _ComputeTimeout(Exception):
    """Raised from the engine's progress callback when a request's compute budget is spent."""


class _ClientGone(Exception):
    """Raised from the engine's progress callback when the request's client has disconnected."""


#: The status logged for work stopped because its client left (nginx's "client closed request");
#: nobody is there to receive it.
CLIENT_GONE_STATUS = 499


def http_error(error: openai.APIError) -> HTTPException:
    """The exception LitServe carries from a worker to the client (headers would be dropped)."""
    return HTTPException(status_code=error.status, detail=error.body)


class UpscaleAPI(ls.LitAPI):
    """OpenAI-compatible image edits served by one `clarity.Upscaler` per model of a `Catalogue`.

    Everything passed to the constructor must pickle: workers are spawned processes, and the
    models are loaded in `setup`, in each worker (so every model is resident in every worker).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        output_dir: str | Path,
        public_url: str,
        file_ttl_seconds: float,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
        max_compute_seconds: float | None = None,
        speed: SpeedOptions | None = None,
        cancellations: CancelRegistry | None = None,
        log_level: str = "info",
        progress_log_seconds: float = DEFAULT_PROGRESS_SECONDS,
    ) -> None:
        super().__init__(api_path=openai.EDITS_PATH)
        #: Requests whose clients disconnected (marked by the HTTP process, read here).
        self.cancellations = cancellations
        self.catalogue = catalogue
        self.output_dir = Path(output_dir)
        self.public_url = public_url.rstrip("/")
        self.file_ttl_seconds = file_ttl_seconds
        self.max_input_pixels = max_input_pixels
        self.max_output_pixels = max_output_pixels
        self.max_compute_seconds = max_compute_seconds
        self.speed = speed or SpeedOptions()
        self.log_level = log_level
        self.progress_log_seconds = progress_log_seconds

    def setup(self, device: str) -> None:
        from clarity import Upscaler
        from clarity.models.catalogue import upscaler_kwargs

        configure_logging(self.log_level)  # a spawned worker starts with Python's defaults
        self.upscalers: dict[str, Upscaler] = {}
        for model_id in self.catalogue.models:
            upscaler = Upscaler.from_pretrained(**upscaler_kwargs(self.catalogue, model_id), device=device,
                                                max_output_pixels=self.max_output_pixels, speed=self.speed)
            if upscaler.tiny_model:
                logger.warning("model %s is the tiny test model: its outputs have no meaningful detail", model_id)
            self.upscalers[model_id] = upscaler
        self.files = FileStore(self.output_dir, self.file_ttl_seconds)

    # `request` stays unannotated: LitServe reads the annotation as the endpoint's request type
    # (a starlette Request), and hands this method the parsed multipart form.
    def decode_request(self, request) -> openai.EditRequest:
        """Validate the form into an `EditRequest`; every mistake is a 4xx naming its field."""
        items = request.multi_items()
        request_id = None
        if items and items[0][0] == REQUEST_ID_FIELD:  # put first by the HTTP process
            request_id, items = items[0][1], items[1:]
        if self._cancelled(request_id):
            logger.warning("request %s skipped: its client disconnected while it was queued", request_id)
            raise HTTPException(CLIENT_GONE_STATUS)
        try:
            edit = openai.parse_edit_form(items, self.catalogue.models, max_input_pixels=self.max_input_pixels)
            return dataclasses.replace(edit, request_id=request_id)
        except openai.APIError as error:
            raise http_error(error) from None
        except ParamError as error:
            raise http_error(openai.invalid(error.param, str(error))) from None

    def predict(self, request: openai.EditRequest) -> tuple[openai.EditRequest, Any]:
        started = time.monotonic()
        model = request.model or self.catalogue.default_model
        log = RequestLog(logger, request.request_id, self.progress_log_seconds)
        width, height = request.image.size
        log.started_work(f"model {model}, {width}x{height} at scale {request.params.scale_factor:g}, n={request.n}")

        def check_deadline(event: Any) -> None:
            # Called by the engine after every denoising step: the only place a running
            # upscale can stop early.
            if self.max_compute_seconds and time.monotonic() - started > self.max_compute_seconds:
                raise _ComputeTimeout
            if self._cancelled(request.request_id):
                raise _ClientGone
            log.progress(event.fraction)

        upscaler = self.upscalers[model]
        try:
            result = upscaler.upscale(
                request.image, request.params, num_images=request.n, mask=request.mask, progress=check_deadline
            )
        except _ClientGone:
            logger.warning("request %s stopped: its client disconnected", request.request_id)
            raise HTTPException(CLIENT_GONE_STATUS) from None
        except _ComputeTimeout:
            logger.warning("request %s stopped: over the compute limit of %g s", request.request_id,
                           self.max_compute_seconds)
            message = f"The upscale took longer than this server's limit of {self.max_compute_seconds:g} s."
            raise http_error(openai.APIError(504, message, code="compute_timeout")) from None
        except ContentPolicyError as error:
            logger.info("request %s refused: %s", request.request_id, error.message)
            raise http_error(openai.content_policy_violation(error.message)) from None
        except ParamError as error:
            logger.info("request %s refused: %s", request.request_id, error)
            raise http_error(openai.invalid(error.param, str(error))) from None
        except Exception:
            # Logged here, in the worker, with the traceback; the client only learns it failed.
            logger.exception("request %s failed", request.request_id)
            raise http_error(openai.APIError(500, "The upscale failed on the server.")) from None
        out_width, out_height = result.images[0].size
        log.finished(f"{len(result.images)} image(s) of {out_width}x{out_height}")
        return request, result

    def _cancelled(self, request_id: str | None) -> bool:
        return self.cancellations is not None and self.cancellations.is_cancelled(request_id)

    def encode_response(self, output: tuple[openai.EditRequest, Any]) -> dict[str, Any]:
        request, result = output
        data = []
        for image, seed in zip(result.images, result.stats.seeds, strict=True):
            encoded = encode_image(image, request.output_format, request.output_compression)
            if request.response_format == "b64_json":
                item = {"b64_json": base64.b64encode(encoded).decode("ascii")}
            else:
                name = self.files.save(encoded, request.output_format)
                item = {"url": f"{self.public_url}{FILES_ROUTE}/{name}"}
            # `seed` is Clarity's addition: what to send to reproduce this variant alone.
            data.append({**item, "revised_prompt": request.params.prompt, "seed": seed})
        sizes = [image.size for image in result.images]
        return openai.images_response(
            data, request.output_format, sizes[0], openai.megapixels(sizes), result.stats.seconds,
            retries=result.stats.retries,
        )
