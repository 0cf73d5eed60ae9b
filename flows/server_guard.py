"""Run a Python module as a child that never outlives its parent process.

    python -m flows.server_guard PARENT_PID MODULE [ARGS...]

runs ``MODULE`` as ``__main__`` (like ``python -m MODULE ARGS...``) with a watchdog thread that
stops the process as soon as ``PARENT_PID`` is gone, whatever killed it (SIGKILL from the
out-of-memory killer included, which the parent cannot handle). ``simu`` starts Prefect's
temporary API server (uvicorn) through it, so no orphan server keeps its port and database.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def parent_alive(parent_pid: int) -> bool:
    """False once the parent has exited (this process was re-parented, or the pid is gone)."""
    if os.getppid() != parent_pid:
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent_pid: int) -> None:
    while parent_alive(parent_pid):
        time.sleep(POLL_SECONDS)
    # Ask the server to shut down cleanly (uvicorn handles SIGTERM), then make sure.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m flows.server_guard PARENT_PID MODULE [ARGS...]")
    parent_pid, module, arguments = int(argv[0]), argv[1], argv[2:]
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
