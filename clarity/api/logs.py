"""What the server tells its operator: one log format for the HTTP process and every worker, and
a line when each request starts, every so often while it runs, and when it ends.

Workers are spawned processes that do not inherit the parent's logging setup, so each applies
`configure_logging` itself when it starts.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

#: Levels `--log-level` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Seconds between progress lines of one running request (the first comes after as long).
DEFAULT_PROGRESS_SECONDS = 30.0
_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_HANDLER_NAME = "clarity-serving"


def configure_logging(level: str) -> None:
    """Send the `clarity` loggers' records at `level` and above to stderr, once per process.

    Only the `clarity` logger is touched: LitServe and uvicorn keep their own output.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    root = logging.getLogger("clarity")
    root.setLevel(level.upper())
    if not any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.propagate = False  # not twice, should the host application log the root too


class RequestLog:
    """Log lines for one request: `started`, then `progress` as often as the engine reports, `finished`.

    Progress is written at most every `interval` seconds, so short requests log only their
    start and end and long ones show that they are moving (and how fast).
    """

    def __init__(
        self, logger: logging.Logger, request_id: str | None, interval: float = DEFAULT_PROGRESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.name, self.interval, self.clock = logger, request_id or "-", interval, clock
        self.started = clock()
        self.last_line = self.started

    def started_work(self, description: str) -> None:
        self.logger.info("request %s started: %s", self.name, description)

    def progress(self, fraction: float) -> None:
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.logger.info("request %s: %.0f %% after %.0f s", self.name, 100 * fraction, now - self.started)

    def finished(self, description: str) -> None:
        self.logger.info("request %s finished in %.1f s: %s", self.name, self.clock() - self.started, description)
