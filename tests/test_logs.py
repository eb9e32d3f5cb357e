"""What the server tells its operator: a line per request start and end, progress while it runs."""

from __future__ import annotations

import logging
import re

import openai
import pytest

from clarity.api.logs import RequestLog, configure_logging
from tests.conftest import running_server
from tests.test_server import edit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_logged_at_most_once_per_interval(caplog):
    clock = FakeClock()
    log = RequestLog(logging.getLogger("test.requests"), "req-1", interval=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.requests"):
        log.started_work("model m, 64x64 at scale 2, n=1")
        for second in range(1, 101):  # one denoising step a second for 100 s
            clock.now += 1
            log.progress(second / 100)
        log.finished("1 image(s) of 128x128")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "request req-1 started: model m, 64x64 at scale 2, n=1",
        "request req-1: 30 % after 30 s",
        "request req-1: 60 % after 60 s",
        "request req-1: 90 % after 90 s",
        "request req-1 finished in 100.0 s: 1 image(s) of 128x128",
    ]


@pytest.fixture
def clarity_logger():
    """The `clarity` logger, restored afterwards (caplog elsewhere needs it to propagate)."""
    logger = logging.getLogger("clarity")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_configure_logging_names_a_bad_level_and_adds_one_handler(clarity_logger):
    with pytest.raises(ValueError, match="level must be one of"):
        configure_logging("verbose")
    configure_logging("info")
    configure_logging("debug")
    assert [h.get_name() for h in clarity_logger.handlers].count("clarity-serving") == 1
    assert clarity_logger.level == logging.DEBUG


def test_the_worker_logs_each_request_start_progress_and_end(tiny_weights, tmp_path, capfd):
    # The worker is a spawned process: its lines reach this process's stderr, not caplog.
    with running_server(tiny_weights, tmp_path, progress_log_seconds=0, max_output_mp=0.01) as http:
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        response = edit(client, response_format="b64_json")
        with pytest.raises(openai.BadRequestError):
            edit(client, extra_body={"creativity": 7})  # refused while the form is read
        with pytest.raises(openai.BadRequestError):
            edit(client, extra_body={"scale_factor": 4})  # refused by the engine: over the pixel cap
    err = capfd.readouterr().err
    started = re.search(r"INFO clarity\.api\.handler\[\d+\]: request (\S+) started: model clarity-upscaler,"
                        r" 40x32 at scale 2, n=1", err)
    assert started, err[-2000:]
    assert started.group(1) == response._request_id  # the client sees the id its lines carry
    request_id = re.escape(started.group(1))
    assert re.search(rf"request {request_id}: 100 % after \d+ s", err), err[-2000:]
    assert re.search(rf"request {request_id} finished in [\d.]+ s: 1 image\(s\) of 80x64", err), err[-2000:]
    assert err.count(" started: ") == 2  # not the request with a bad field
    assert re.search(r"request req_\w+ refused: scale_factor: the output would be 160x128", err), err[-2000:]
