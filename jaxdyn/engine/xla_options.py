"""Process-wide XLA options the engine sets on a GPU before JAX's backend starts.

**The command-buffer update mode.** XLA runs a compiled step as a CUDA graph (a command buffer) and, in its
default mode (``ALWAYS_UPDATE``), updates the graph's nodes whenever a buffer they use moved since the last call,
the step's temporary buffer included, which the allocator hands out anew every call. ``SKIP_TEMP`` gives that
buffer one address for the executable's life, so the update touches only the nodes of the step's own inputs and
outputs. On an H200 (jax 0.11.2, the 8B shape in fp8) this took the small steps' device time down by about 1 ms at
128 tokens with the engine's host-side inputs (``benchmarks.gpu.dispatch_probe``: 5.25 to 4.21 ms) and gave
1.033x and 1.071x the offline ShareGPT-shaped throughput in two calls; the greedy tokens are those of the default
mode (``benchmarks/results/gpu_suite_h200.md``, twenty-seventh session). ``SKIP_PROFILED`` was 2.5-13x slower.

**The share of a GPU's memory JAX takes** (``gpu_memory_fraction``, vLLM's ``gpu_memory_utilization``): JAX's
allocator takes at most a fraction of each GPU's memory, read from ``XLA_CLIENT_MEM_FRACTION`` (or the deprecated
``XLA_PYTHON_CLIENT_MEM_FRACTION``) when its backend starts, 0.75 without either. The engine's KV pages are sized
within that limit (``EngineConfig.kv_memory_fraction`` of it, less the weights), so JAX's default left a quarter of
each GPU to nothing. ``EngineConfig.gpu_memory_utilization`` (``--gpu-memory-utilization``) sets it before the
backend starts; left None, the environment's value stands, else 0.9 as vLLM's (on an H100 JAX's limit then read
71.3 GiB of 79.2, session 46). Known defect (session 46, ``benchmarks/gpu/memory_probe.py``): with default pages, the
8B bf16 engine with the GPU suite's 1,024 sequences and ten token buckets ran out of memory while it was built on
an H100, at 0.75 and at 0.9 alike: the 15 % of the limit the pages leave did not hold what the build takes besides
weights and pages; explicit ``num_pages`` leaving 12.7 GiB built.

XLA reads ``XLA_FLAGS`` once, when JAX's first backend starts, so this adds the mode to the environment only
before that (``build_engine`` calls it first thing; a process that has already run a JAX computation keeps
XLA's default), only where a CUDA plugin is installed and JAX may use it, and only on jaxlib 0.11 or later
(0.10 refuses the value and would abort the process). A mode already in ``XLA_FLAGS`` (or in a ``--flagfile`` it
names) is left as it is: set ``--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE`` there to keep XLA's default.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os

logger = logging.getLogger(__name__)

UPDATE_MODE_FLAG = "--xla_gpu_command_buffer_update_mode"
_FLAG_NAME = UPDATE_MODE_FLAG.lstrip("-")
UPDATE_MODE = "SKIP_TEMP"
CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")   # JAX's name, its deprecated one
JAX_MEM_FRACTION = 0.75                 # JAX's allocator without either
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9    # vLLM's


def _version(dist: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _cuda_plugin_installed() -> bool:
    return any(_version(d) is not None for d in CUDA_PLUGINS)


def _backends_started() -> bool:
    import sys
    if "jax" not in sys.modules:        # JAX not even imported: nothing has started
        return False
    from jax._src import xla_bridge
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def _may_use_gpu(environ) -> bool:
    platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
    return not platforms or any(p.strip() in ("cuda", "gpu") for p in platforms.split(","))


def _sets_mode(flags: str) -> bool:
    """Whether ``XLA_FLAGS`` sets the update mode, itself or in a ``--flagfile`` it names (one that cannot be
    read counts as setting it: the user's flags are not overridden on a guess)."""
    if _FLAG_NAME in flags:
        return True
    for token in flags.split():
        if token.lstrip("-").startswith("flagfile="):
            try:
                with open(token.split("=", 1)[1]) as f:
                    if _FLAG_NAME in f.read():
                        return True
            except OSError:
                return True
    return False


def command_buffer_update_mode(environ=None, *, jaxlib_version: tuple[int, ...] | None = None,
                               cuda_plugin: bool | None = None, backends_started: bool | None = None) -> str | None:
    """Add ``--xla_gpu_command_buffer_update_mode=SKIP_TEMP`` to ``environ["XLA_FLAGS"]`` (``os.environ`` by
    default) where it applies (see the module's text); returns the mode added, or None where nothing changed.
    The keyword arguments stand in for what is otherwise read from the installed packages and JAX (tests)."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if _sets_mode(flags) or not _may_use_gpu(environ):
        return None
    version = _version("jaxlib") if jaxlib_version is None else jaxlib_version
    if version is None or version[:2] < (0, 11):
        return None
    if not (_cuda_plugin_installed() if cuda_plugin is None else cuda_plugin):
        return None
    if _backends_started() if backends_started is None else backends_started:
        logger.info("JAX's backend has already started in this process: XLA's command-buffer update mode stays "
                    "its default (set %s=%s in XLA_FLAGS before it starts)", UPDATE_MODE_FLAG, UPDATE_MODE)
        return None
    environ["XLA_FLAGS"] = f"{flags} {UPDATE_MODE_FLAG}={UPDATE_MODE}".strip()
    return UPDATE_MODE


def _environ_fraction(environ) -> float | str | None:
    """The memory fraction the environment gives JAX (None: neither variable set; the text where it is not a
    number, which JAX itself refuses as it starts)."""
    for var in MEM_FRACTION_VARS:
        if environ.get(var):
            try:
                return float(environ[var])
            except ValueError:
                return environ[var]
    return None


def gpu_memory_fraction(fraction: float | None, environ=None, *, cuda_plugin: bool | None = None,
                        backends_started: bool | None = None) -> float | None:
    """Set the share of each GPU's memory JAX's allocator may take to ``fraction`` in ``environ``
    (``os.environ`` by default) before JAX's backend starts; returns the fraction set, or None where nothing
    changed. ``fraction`` None: the environment's own (``MEM_FRACTION_VARS``, as it is written) stands, else
    ``DEFAULT_GPU_MEMORY_UTILIZATION``. Nothing where no CUDA plugin is installed or JAX may not use it. A
    ``fraction`` given once the backend has started that differs from the one it started with is a ValueError
    naming both (the allocator's limit is fixed by then). The keyword arguments stand in for what is otherwise
    read from the installed packages and JAX (tests)."""
    environ = os.environ if environ is None else environ
    current = _environ_fraction(environ)
    if fraction is None and current is not None:
        return None
    if not _may_use_gpu(environ) or not (_cuda_plugin_installed() if cuda_plugin is None else cuda_plugin):
        return None
    if _backends_started() if backends_started is None else backends_started:
        started_with = JAX_MEM_FRACTION if current is None else current
        if fraction is not None and fraction != started_with:
            raise ValueError(f"gpu_memory_utilization={fraction}: JAX's backend has already started in this process "
                             f"with {started_with} of each GPU's memory, which cannot change now; give it to the "
                             "process's first engine, or set XLA_CLIENT_MEM_FRACTION before JAX starts")
        return None
    fraction = DEFAULT_GPU_MEMORY_UTILIZATION if fraction is None else fraction
    for var in MEM_FRACTION_VARS:       # both set is an error in JAX: the given value replaces the old name too
        environ.pop(var, None)
    environ[MEM_FRACTION_VARS[0]] = str(fraction)
    return fraction
