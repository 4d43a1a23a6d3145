"""jaxdyn: a JAX/XLA-compiled LLM inference engine (paged KV cache, compiled steps, Pallas attention)."""

__version__ = "0.1.0"
