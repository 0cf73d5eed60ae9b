"""Start and stop of a ``simu`` command's process: quiet Prefect, signals, the temporary server.

- Prefect's server telemetry is off unless the user set ``PREFECT_SERVER_ANALYTICS_ENABLED``: its
  heartbeat races the temporary server's first database migration (``database is locked``
  traceback on a fresh ``PREFECT_HOME``) and phones home from a research tool.
- SIGTERM (``kill``, batch schedulers, ``timeout``) is handled like Ctrl-C: the work stops with a
  ``KeyboardInterrupt``, the pipeline records the run as ``interrupted`` and the command exits.
  A watcher thread sees the signal even while the main thread waits in C (a sweep waiting for its
  points): it sets :data:`STOP` at once and, when the command is still running
  ``_STOP_GRACE_SECONDS`` later (a sweep point inside a long stage in another thread), records
  the runs still open as ``interrupted`` (:func:`on_forced_exit`) and ends the process.
- Without ``PREFECT_API_URL``, the temporary API server is started here, in its own session (a
  Ctrl-C or ``timeout``'s signal to the process group does not kill it before the run's final
  states reach it) and under :mod:`flows.server_guard` (it exits when this process dies, even by
  SIGKILL). :func:`shutdown` drains Prefect's log and event queues for a bounded time, stops the
  server and, should Prefect's own at-exit drain still hang, ends the process after a few seconds.

Everything here runs only from ``simu``'s ``main``: importing this module changes nothing.
"""

from __future__ import annotations

import logging
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

# Set when the command was asked to stop; stages check it, so pipeline runs in worker threads
# (sweeps) stop at their next stage and record themselves as interrupted too.
STOP = threading.Event()

_DRAIN_SECONDS = 5.0
_SERVER_STOP_SECONDS = 3.0
_EXIT_GRACE_SECONDS = 10.0
_STOP_GRACE_SECONDS = 20.0
# Prefect's default (20 s) is too short for a first start (database migrations) on a busy machine.
_STARTUP_TIMEOUT_SECONDS = 120
_server: Any = None
_stop_signal = signal.SIGTERM
_raised = threading.Event()
_forced_exit_callbacks: dict[int, Callable[[int], None]] = {}
_callbacks_lock = threading.Lock()
_tokens = itertools.count()


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop (SIGTERM or Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def configure_environment() -> None:
    """Prefect settings of a ``simu`` process, set before Prefect is imported (user's values win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def raise_if_stopping() -> None:
    """Raise :class:`Interrupted` when the command was asked to stop (checked between stages)."""
    if STOP.is_set():
        raise Interrupted(_stop_signal)


def on_forced_exit(callback: Callable[[int], None]) -> int:
    """Call ``callback(signum)`` if the process is ended by the stop watchdog; returns a token."""
    token = next(_tokens)
    with _callbacks_lock:
        _forced_exit_callbacks[token] = callback
    return token


def forget(token: int) -> bool:
    """Drop a callback of :func:`on_forced_exit`; False when it was already taken (called)."""
    with _callbacks_lock:
        return _forced_exit_callbacks.pop(token, None) is not None


def _request_stop(signum: int) -> None:
    global _stop_signal
    if STOP.is_set():
        return
    _stop_signal = signum
    STOP.set()
    timer = threading.Timer(_STOP_GRACE_SECONDS, _stop_now, args=(signum,))
    timer.daemon = True
    timer.start()


def _stop_now(signum: int) -> None:
    """The command did not stop in time (e.g. a sweep point inside a long stage): end it."""
    print(f"\nsimu: still running {_STOP_GRACE_SECONDS:.0f} s after {signal.Signals(signum).name}; "
          "stopping now", file=sys.stderr)
    with _callbacks_lock:
        callbacks = list(_forced_exit_callbacks.values())
        _forced_exit_callbacks.clear()
    for callback in callbacks:
        try:
            callback(signum)
        except Exception as error:  # noqa: BLE001 - record what can be recorded, then stop anyway
            print(f"simu: could not record an interrupted run: {error!r}", file=sys.stderr)
    _force_exit(128 + signum)


def _on_signal(signum: int, _frame: Any) -> None:
    _request_stop(signum)
    if not _raised.is_set():
        _raised.set()
        raise Interrupted(signum)
    # A second signal while stopping: the shutdown is already bounded, let it finish.


def _watch_signals(read_fd: int) -> None:
    while True:
        try:
            received = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                _request_stop(signum)


def install_signal_handlers() -> None:
    """SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, once; a watcher thread
    (the signal module's wakeup fd) sets :data:`STOP` even while the main thread is blocked."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_fd,), name="simu-signal-watcher", daemon=True).start()


def _guarded_popen(popen: Any) -> Any:
    """``subprocess.Popen`` that runs ``python -m uvicorn ...`` under :mod:`flows.server_guard`."""

    def start(args: Any, *positional: Any, **kwargs: Any) -> subprocess.Popen:
        args = list(args)
        if len(args) >= 3 and args[1:3] == ["-m", "uvicorn"]:
            args = [args[0], "-m", "flows.server_guard", str(os.getpid()), *args[2:]]
            kwargs["start_new_session"] = True
        return popen(args, *positional, **kwargs)

    return start


def start_temporary_server() -> None:
    """Start Prefect's temporary API server (guarded) unless ``PREFECT_API_URL`` names a server."""
    global _server
    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        return

    class GuardedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            original = server_module.subprocess
            shim = type(sys)("subprocess_shim")
            shim.__dict__.update(original.__dict__)
            shim.Popen = _guarded_popen(original.Popen)
            server_module.subprocess = shim
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = original

    # Registered as the default (port None) instance: Prefect's clients ask for exactly that one.
    _server = GuardedServer()
    user_timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    _server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() if user_timeout
                  else _STARTUP_TIMEOUT_SECONDS)


def _drain_prefect_queues(timeout: float) -> None:
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except Exception:  # noqa: BLE001 - Prefect never imported or half torn down: nothing to drain
        return
    deadline = time.monotonic() + timeout
    for worker in (APILogWorker, EventsWorker):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            worker.drain_all(timeout=remaining)
        except Exception:  # noqa: BLE001 - a dead server must not stop the shutdown
            pass


def shutdown(exit_code: int) -> None:
    """Drain Prefect's queues (bounded), stop the temporary server, bound the rest of the exit.

    After a stop request the process ends here: the interpreter's own finalisation (torch, Prefect's
    threads) takes several more seconds and has nothing left to save.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # Whatever follows (Prefect's unbounded at-exit drain retrying a dead server, worker threads of
    # a sweep still in a stage) may take at most this long; then the process ends.
    exit_timer = threading.Timer(_EXIT_GRACE_SECONDS, _force_exit, args=(exit_code,))
    exit_timer.daemon = True
    exit_timer.start()
    if "prefect" in sys.modules:
        _drain_prefect_queues(_DRAIN_SECONDS)
    _stop_server()
    if STOP.is_set():
        _force_exit(exit_code)


def _stop_server() -> None:
    process = getattr(_server, "server_process", None)
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    if _server is not None:
        _server.stop()  # reaps the process, forgets the instance


def _force_exit(exit_code: int) -> None:
    try:
        process = getattr(_server, "server_process", None)
        if process is not None:
            process.kill()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(exit_code)
