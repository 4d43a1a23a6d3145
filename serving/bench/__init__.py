"""Serving benchmarks: ``jaxdyn bench serve`` (any OpenAI-compatible server over HTTP) and ``bench offline``.

``datasets`` makes the prompts, ``client`` streams one request and times it,
``serve`` schedules the load, ``metrics`` turns records into vLLM's figures,
``report`` prints, saves, compares and plots them, ``offline`` drives the engine
without HTTP.
"""


class BenchError(ValueError):
    """A bad benchmark input (flag, file, unreachable server); the CLI prints it as one line, exit 2."""
