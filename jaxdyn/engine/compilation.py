"""A process-wide count of XLA compilations, and the error raised when one happens while serving."""

from __future__ import annotations

import threading

import jax

# The event jax records around every backend compilation (jit, AOT and eager ops alike).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_count = 0


class CompiledAfterWarmupError(RuntimeError):
    """Something compiled after warm-up: a shape escaped the bucket list."""


def _on_event_duration(event: str, duration_secs: float, **kwargs) -> None:
    global _count
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def compilation_count() -> int:
    """Compilations in this process since jaxdyn was imported."""
    return _count
