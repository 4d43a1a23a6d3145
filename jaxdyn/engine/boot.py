"""Starting the engine process, from a module that imports no JAX.

``jaxdyn serve`` starts its engine process first and only then imports its own stack (uvicorn, the app, JAX for
the engine's types), so that the child's start-up (Python, JAX and the engine's imports, the backend) runs
while the server imports. ``ProcessEngine(..., started=start_engine_process(build))`` adopts the process.
"""

from __future__ import annotations

import multiprocessing
import signal


def start_engine_process(build: dict):
    """Spawn the engine process for ``build`` (``build_engine``'s arguments, ``config`` as a dict of
    ``EngineConfig`` fields); returns (process, the server's end of the pipe)."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_boot, args=(child, build), name="jaxdyn-engine", daemon=True)
    proc.start()
    child.close()
    return proc, conn


def _boot(conn, build: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the server, which drains and stops us
    from jaxdyn.engine.core import EngineConfig
    from jaxdyn.engine.process import _engine_main
    _engine_main(conn, {**build, "config": EngineConfig(**build["config"])})
