"""One edits request, from form to engine to response: the same steps for every runtime.

    handler = EditHandler(config, catalogue)      # in the front end: picklable, nothing loaded
    handler.load(device)                          # in each worker: every served model
    request = handler.parse(form_items)           # 4xx naming the field, before any work
    result = handler.run(request, cancelled=...)  # the upscale, stopped on a deadline or cancel;
                                                  # a job's progress and previews go to its store
    body = handler.respond(request, result)       # OpenAI's ImagesResponse; url mode stores files

Every expected failure leaves as an `APIError` (status and OpenAI-shaped body); a runtime only
carries it to the client. Deadline and cancellation are plain callables checked after every
denoising step, the only place a running upscale can stop early.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from clarity.api import metrics, wire
from clarity.api.budget import check_budget
from clarity.api.config import ServerConfig
from clarity.api.errors import CLIENT_GONE_STATUS, ENGINE_FAILURE, APIError, api_error, storage_unavailable
from clarity.api.jobs import JobStore
from clarity.api.logs import RequestLog
from clarity.api.progress import JobProgress
from clarity.api.results import ResultStore, StorageFull, StorageUnavailable, result_url
from clarity.errors import ClarityError
from clarity.imageio import encode_image

if TYPE_CHECKING:
    from clarity import ProgressEvent, Upscaler, UpscaleResult
    from clarity.models.catalogue import Catalogue

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from the engine's progress callback to stop a running upscale; answered with `error`."""

    def __init__(self, error: APIError, reason: str) -> None:
        super().__init__(reason)
        self.error = error


def client_gone() -> APIError:
    """The answer for work whose client disconnected: logged, never received."""
    return APIError(CLIENT_GONE_STATUS, "The client closed the connection.", code="client_gone")


def job_cancelled() -> APIError:
    """The answer for work whose job was cancelled (or deleted): only the job runner reads it."""
    return APIError(CLIENT_GONE_STATUS, "The job was cancelled.", code="cancelled")


def _never() -> bool:
    return False


class EditHandler:
    """`POST /v1/images/edits` for the models of `catalogue`, under `config`'s limits.

    `results` keeps url-mode outputs, `jobs` the jobs whose forms a runtime hands in (tagged with
    their id); each runtime gives the ones its processes share. Everything passed in must pickle:
    runtimes build the handler in the front end and load the models in each worker (`load`), so
    every model is resident in every worker.
    """

    def __init__(self, config: ServerConfig, catalogue: Catalogue, results: ResultStore,
                 jobs: JobStore | None = None) -> None:
        self.config = config
        self.catalogue = catalogue
        self.results = results
        self.jobs = jobs
        self.upscalers: dict[str, Upscaler] = {}
        self.device = "cpu"

    def load(self, device: str) -> None:
        """Load every served model onto `device`."""
        from clarity import Upscaler
        from clarity.models.catalogue import upscaler_kwargs

        self.device = device
        for model_id in self.catalogue.models:
            started = time.monotonic()
            self.upscalers[model_id] = Upscaler.from_pretrained(
                **upscaler_kwargs(self.catalogue, model_id), device=device,
                max_output_pixels=self.config.max_output_pixels, speed=self.config.speed,
                cpu_workers=self.config.workers_per_device,  # on the CPU, the workers sharing its cores
            )
            metrics.record_model_load(model_id, time.monotonic() - started)
        metrics.record_gpu_memory(device)

    def parse(
        self, items: Iterable[tuple[str, Any]], request_id: str | None = None, base_url: str | None = None,
        received_at: float | None = None, job_id: str | None = None,
    ) -> wire.EditRequest:
        """Validate a form into an `EditRequest`; every mistake is an `APIError` naming its field.

        `base_url` is how the client reached the server (its result URLs start there, unless the
        server has a `public_url`); `received_at` (`time.time()`) when it arrived there, for the
        queue wait metric; `job_id` the job whose form it is.
        """
        metrics.record_queue_wait(received_at)
        try:
            edit = wire.parse_edit_form(items, self.catalogue.models, max_input_pixels=self.config.max_input_pixels)
        except ClarityError as error:
            raise self._refused(metrics.UNKNOWN_MODEL, api_error(error)) from None
        model = self._model_of(edit)
        try:
            check_budget(edit.image.size, edit.params, edit.n, self.config.max_denoising_mp_steps)
            if edit.response_format == "url":
                try:
                    self.results.check_room()  # before minutes of work whose result could not be kept
                except StorageFull as full:
                    raise APIError(503, str(full), code="storage_full") from None
                except StorageUnavailable as unavailable:
                    raise _storage_unavailable(request_id, unavailable) from None
        except APIError as error:
            raise self._refused(model, error) from None
        return dataclasses.replace(edit, request_id=request_id, base_url=base_url, job_id=job_id)

    def _model_of(self, request: wire.EditRequest) -> str:
        """The served model that answers `request`: the one it names, else the default."""
        return request.model or self.catalogue.default_model

    @staticmethod
    def _refused(model: str, error: APIError) -> APIError:
        """`error`, counted as the answer to an edit of `model`."""
        metrics.record_edit(model, error.status)
        return error

    def run(self, request: wire.EditRequest, cancelled: Callable[[], bool] = _never) -> UpscaleResult:
        """Upscale `request`, checking the compute deadline and `cancelled()` after every denoising step;
        a job's request reports progress and previews to its job, and stops when the job is cancelled."""
        started = time.monotonic()
        model = self._model_of(request)
        log = RequestLog(logger, request.request_id, self.config.progress_log_seconds)
        width, height = request.image.size
        log.started_work(f"model {model}, {width}x{height} at scale {request.params.scale_factor:g}, n={request.n}")
        limit = self.config.max_compute_seconds
        job = self._job_progress(request)

        def check(event: ProgressEvent) -> None:
            if limit and time.monotonic() - started > limit:
                message = f"The upscale took longer than this server's limit of {limit:g} s."
                raise _Stop(APIError(504, message, code="compute_timeout"), f"over the compute limit of {limit:g} s")
            if cancelled():
                raise _Stop(client_gone(), "its client disconnected")
            if job is not None and job.cancelled():
                raise _Stop(job_cancelled(), "its job was cancelled")
            log.progress(event.fraction)
            if job is not None:
                job(event)

        try:
            with metrics.running():
                result = self.upscalers[model].upscale(
                    request.image, request.params, num_images=request.n, mask=request.mask, progress=check
                )
        except _Stop as stop:
            logger.warning("request %s stopped: %s", request.request_id, stop)
            if stop.error.status == CLIENT_GONE_STATUS:
                metrics.record_cancelled("running")
            else:
                metrics.record_compute_timeout()
            raise self._refused(model, stop.error) from None
        except ClarityError as error:
            logger.info("request %s refused: %s", request.request_id, error)
            raise self._refused(model, api_error(error)) from None
        except Exception:
            # Logged here, in the worker, with the traceback; the client only learns it failed.
            logger.exception("request %s failed", request.request_id)
            raise self._refused(model, APIError(500, ENGINE_FAILURE)) from None
        finally:
            metrics.record_gpu_memory(self.device)
        out_width, out_height = result.images[0].size
        log.finished(f"{len(result.images)} image(s) of {out_width}x{out_height}")
        self._record_output(model, result)
        return result

    def _job_progress(self, request: wire.EditRequest) -> JobProgress | None:
        """For a job's request: the job marked running, and its reporter; `job_cancelled` if it was cancelled
        (or deleted) while queued."""
        if request.job_id is None or self.jobs is None:
            return None
        job = self.jobs.get(request.job_id)
        if job is None or not self.jobs.mark_running(request.job_id):
            logger.info("request %s skipped: its job %s was cancelled", request.request_id, request.job_id)
            raise self._refused(self._model_of(request), job_cancelled())
        return JobProgress(self.jobs, request.job_id, job.partial_images, request.output_format,
                           request.output_compression)

    @staticmethod
    def _record_output(model: str, result: UpscaleResult) -> None:
        stats = result.stats
        megapixels = wire.megapixels(image.size for image in result.images)
        metrics.record_output(model, len(result.images), megapixels, sum(p.denoising_steps for p in stats.passes),
                              stats.seconds_by_stage.get("denoise", 0.0), len(stats.retries))

    def _base_url(self, request: wire.EditRequest) -> str:
        """Where the request's result URLs point: the server's `public_url`, else where its client came."""
        if self.config.public_url or not request.base_url:
            return self.config.base_url
        return request.base_url.rstrip("/")

    def respond(self, request: wire.EditRequest, result: UpscaleResult) -> dict[str, Any]:
        """The `ImagesResponse` body: each image encoded, inline or stored for url mode."""
        data = []
        for image, seed in zip(result.images, result.stats.seeds, strict=True):
            encoded = encode_image(image, request.output_format, request.output_compression)
            if request.response_format == "b64_json":
                item = {"b64_json": base64.b64encode(encoded).decode("ascii")}
            else:
                try:
                    name = self.results.save(encoded, request.output_format)
                except StorageFull as full:  # filled up while this request ran: retrying would redo it all
                    logger.warning("request %s: its result could not be stored: %s", request.request_id, full)
                    error = APIError(507, str(full), code="storage_full")
                    raise self._refused(self._model_of(request), error) from None
                except StorageUnavailable as unavailable:
                    error = _storage_unavailable(request.request_id, unavailable)
                    raise self._refused(self._model_of(request), error) from None
                item = {"url": result_url(self._base_url(request), name)}
            # `seed` is Clarity's addition: what to send to reproduce this variant alone.
            data.append({**item, "revised_prompt": request.params.prompt, "seed": seed})
        sizes = [image.size for image in result.images]
        metrics.record_edit(self._model_of(request), 200)
        return wire.images_response(
            data, request.output_format, sizes[0], wire.megapixels(sizes), result.stats.seconds,
            retries=result.stats.retries,
        )


def _storage_unavailable(request_id: str | None, error: StorageUnavailable) -> APIError:
    """`storage_unavailable()` for a request, what failed and where logged."""
    logger.error("request %s: the result store is unavailable: %s", request_id, error)
    return storage_unavailable()
