"""jaxdyn: a JAX/XLA-compiled LLM inference engine (paged KV cache, compiled steps, Pallas attention)."""

__version__ = "0.1.0"

from jaxdyn.engine.sampling_params import SamplingParams  # noqa: E402
from jaxdyn.engine.request import CompletionOutput, RequestOutput  # noqa: E402
from jaxdyn.engine.core import EngineConfig, EngineCore, RequestError  # noqa: E402
from jaxdyn.engine.llm import LLM  # noqa: E402
from jaxdyn.engine.async_engine import AsyncEngine, EngineDeadError  # noqa: E402

__all__ = ["LLM", "SamplingParams", "EngineConfig", "EngineCore", "AsyncEngine", "RequestOutput",
           "CompletionOutput", "RequestError", "EngineDeadError"]
