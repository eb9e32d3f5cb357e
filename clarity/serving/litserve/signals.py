"""Who acts on SIGINT and SIGTERM: the main process alone, however they are sent.

Ctrl-C signals every process of the terminal's foreground group, and systemd (its default
`KillMode=control-group`) every process of the service; `docker stop` and Kubernetes signal the
main process only. For a stop to go the same way in each case, only the main process acts on
them, and it stops the others in order (`patches.SupervisedLitServer`): it has the HTTP
processes drain, then stops the inference workers, then the multiprocessing manager.

- The main process: the first signal begins the graceful stop; a second SIGINT (Ctrl-C again)
  stops everything at once (`install_main_handlers`).
- Inference workers ignore both (`settle_worker_signals`, first thing in the worker). They are
  spawned with both blocked (`stop_signals_blocked`), so that one arriving while a worker
  starts, before it can ignore them, does not kill it.
- HTTP processes drain on either (drain.py), which is also what the main process asks of them
  (with SIGTERM).
- Forked processes that set nothing of their own (the manager; an HTTP process until it
  serves) inherit the main process's handlers, which ignore both outside the main process.
  The manager ignores SIGINT anyway (Python's doing).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from typing import NoReturn

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The exit code after a second Ctrl-C: the shell's code for a process ended by SIGINT.
STOPPED_AT_ONCE = 128 + signal.SIGINT
#: Seconds to wait for each killed child to be gone before exiting.
KILL_WAIT_SECONDS = 2.0


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread, and in the processes it spawns meanwhile
    (the signal mask is inherited), until the block ends.

    Held back, not lost: a signal sent to this process meanwhile goes to another of its threads,
    or waits for the block to end.
    """
    # The first spawn also starts multiprocessing's resource tracker, and unblocks both signals
    # in this thread once that is done; started beforehand, it leaves the mask alone.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def settle_worker_signals(ignore: bool) -> None:
    """In a worker spawned under `stop_signals_blocked`: ignore SIGINT and SIGTERM if `ignore`, then
    take them again (one that arrived meanwhile is dropped if ignored, else acted on now)."""
    if ignore:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def install_main_handlers(begin_stop: Callable[[], bool], shutdown_timeout: float) -> None:
    """Handle SIGINT and SIGTERM in this, the main process (call before any child is forked).

    The first one calls `begin_stop()`, which starts the graceful stop and returns True, or
    returns False if the server is still starting: nothing has been accepted then, so it stops
    at once, with exit code 0. After that a SIGINT stops at once; a SIGTERM changes nothing (the
    stop is already bounded by the shutdown timeout).
    """
    main_pid = os.getpid()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            return  # a forked child that set no handling of its own: the main process stops it
        name = signal.Signals(signum).name
        if not received:
            received.append(signum)
            if not begin_stop():
                stop_at_once(f"{name} while starting: stopping at once", 0)
            logger.info("%s: stopping once the accepted requests are answered (at most %g s); Ctrl-C again stops"
                        " at once", name, shutdown_timeout)
        elif signum == signal.SIGINT:
            stop_at_once("second SIGINT: stopping at once; requests still running get no answer", STOPPED_AT_ONCE)
        else:
            logger.info("%s: already stopping; Ctrl-C (SIGINT) stops at once", name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def stop_at_once(message: str, exit_code: int) -> NoReturn:
    """Log `message`, kill every child process (inference workers, HTTP processes, the manager) and
    exit `exit_code` now: no request is finished or answered, no cleanup runs."""
    logger.warning(message)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(KILL_WAIT_SECONDS)
    os._exit(exit_code)
