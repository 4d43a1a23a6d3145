"""jaxdyn: a JAX/XLA-compiled LLM inference engine (paged KV cache, compiled steps, Pallas attention).

The names below are imported on first use (PEP 562), so ``import jaxdyn.config`` or the light
``jaxdyn.engine.boot`` does not import JAX: ``jaxdyn serve`` starts its engine process before the server's
own imports."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SamplingParams": "jaxdyn.engine.sampling_params",
    "CompletionOutput": "jaxdyn.engine.request",
    "RequestOutput": "jaxdyn.engine.request",
    "EngineConfig": "jaxdyn.engine.core",
    "EngineCore": "jaxdyn.engine.core",
    "RequestError": "jaxdyn.engine.core",
    "LLM": "jaxdyn.engine.llm",
    "AsyncEngine": "jaxdyn.engine.async_engine",
    "EngineDeadError": "jaxdyn.engine.async_engine",
}

__all__ = ["LLM", "SamplingParams", "EngineConfig", "EngineCore", "AsyncEngine", "RequestOutput",
           "CompletionOutput", "RequestError", "EngineDeadError"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxdyn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
