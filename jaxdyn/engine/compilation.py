"""Counts of XLA compilations (process-wide and per thread), and the error raised when one
happens while serving.

Several engines can share a process (disaggregated prefill and decode, tests), each serving on
its own thread: "did this engine compile while serving" is the count on the thread that runs it,
taken around the runner's own calls (``thread_compilation_count``), not the process-wide one.
"""

from __future__ import annotations

import threading

import jax

# The event jax records around every backend compilation (jit, AOT and eager ops alike).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_count = 0
_local = threading.local()


class CompiledAfterWarmupError(RuntimeError):
    """Something compiled after warm-up: a shape escaped the bucket list."""


def _on_event_duration(event: str, duration_secs: float, **kwargs) -> None:
    global _count
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1
        _local.count = getattr(_local, "count", 0) + 1


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def compilation_count() -> int:
    """Compilations in this process since jaxdyn was imported."""
    return _count


def thread_compilation_count() -> int:
    """Compilations on the calling thread (jax compiles on the thread that asks)."""
    return getattr(_local, "count", 0)
