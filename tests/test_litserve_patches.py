"""The LitServe internals clarity/serving/litserve/patches.py relies on are still there, as it uses them.

These fail first, naming the name, when a LitServe upgrade moves one; the behaviour each touch
gives is tested by the tests its comment in patches.py names (test_shutdown.py, test_robustness.py).
"""

from __future__ import annotations

import asyncio
import inspect

import litserve as ls
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from clarity.serving.litserve import patches


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_overridden_methods_keep_their_names_and_parameters():
    # SupervisedLitServer overrides these; LitServe's `run` calls them with these arguments.
    assert _parameters(ls.LitServer._perform_graceful_shutdown)[:3] == ["self", "manager", "uvicorn_workers"]
    assert _parameters(ls.LitServer._start_worker_monitoring) == ["self", "manager", "uvicorn_workers"]
    assert _parameters(ls.LitServer.launch_inference_worker) == ["self", "lit_api"]
    assert _parameters(ls.LitServer.launch_single_inference_worker) == ["self", "lit_api", "worker_id"]
    run = inspect.getsource(ls.LitServer.run)
    assert "self._shutdown_event.wait()" in run and "self._start_worker_monitoring(" in run
    assert "self._perform_graceful_shutdown(" in run


def test_the_attributes_read_and_set_exist_with_their_meaning():
    source = inspect.getsource(ls.LitServer.__init__)
    for name in ("self.response_buffer", "self.uvicorn_graceful_timeout", "self._shutdown_event", "self.lit_api",
                 "self.workers_per_device"):
        assert name in source, name
    # worker_count: LitServe starts this many workers per API (the job runner keeps that many jobs in flight).
    assert "return self.devices * wpd" in inspect.getsource(ls.LitServer._inference_workers_config_for_api)
    # `run` fills the workers list that the monitor and the shutdown walk.
    assert "self.inference_workers.extend(" in inspect.getsource(ls.LitServer.run)
    assert "timeout_graceful_shutdown=self.uvicorn_graceful_timeout" in inspect.getsource(ls.LitServer._start_server)
    assert "self.workers_setup_status = manager.dict()" in inspect.getsource(ls.LitServer._init_manager)


def test_the_response_buffer_items_are_what_the_watchdog_and_drain_answer():
    item = ResponseBufferItem(event=asyncio.Event())
    assert (item.worker_id, item.response) == (None, None)
    assert (LitAPIStatus.ERROR, WorkerSetupStatus.READY) == ("ERROR", "ready")
    buffer = patches.TrackedBuffer()
    buffer["uid"] = item
    [(uid, _, worker_id)] = list(buffer.unanswered())
    assert (uid, worker_id) == ("uid", None)
    from clarity.api.errors import APIError

    buffer.answer("uid", APIError(503, "x"))
    assert item.event.is_set() and item.response[1] == LitAPIStatus.ERROR
    # LitServe's handler re-raises an HTTPException found as an error response, as it is.
    assert "raise response" in inspect.getsource(ls.server.RegularRequestHandler._handle_error_response)


def test_the_form_reaches_decode_request_whole():
    # The request id and base URL travel as form fields put before the body: LitServe must hand
    # `decode_request` the parsed form of a multipart request (its `_prepare_request`).
    source = inspect.getsource(ls.server.BaseRequestHandler._prepare_request)
    assert "multipart/form-data" in source and "await request.form()" in source
