"""Test set-up: 8 virtual CPU devices for tensor-parallel tests, float32 parity settings."""

import os

# Must be set before jax initialises its CPU backend. On a machine without an NVIDIA GPU, LLVM's
# optimisation level 0: the tests' programs are small and compiling them is most of the suite's time (the
# demo engine's warm-up 52 -> 37 s on 2 cores); XLA, not LLVM, decides the floating-point order, so the
# numbers are the same. (On a GPU machine the flag would also leave the GPU kernels unoptimised.)
_flags = " --xla_force_host_platform_device_count=8"
if not os.path.exists("/dev/nvidiactl"):
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _flags).strip()

# One JAX compilation cache for the whole run, the subprocesses the tests start and pytest-xdist's workers
# included (the controller sets it before they start): many tests build the same small engines (the demo's, the
# tiny preset's), and each build compiled every step again. (Two workers may write one entry at once; JAX then
# reads a torn entry as a miss, with a warning, and compiles again.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix="jaxdyn-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Under pytest-xdist (the README's `-n 2`) each worker is a JAX process of its own: on a GPU the first would
# reserve most of the memory for itself and the second fail to start
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# `jaxdyn serve` and `jaxdyn bench` keep compiled steps in the user's cache by default: not from tests
# (a test that wants the cache names its directory)
os.environ.setdefault("JAXDYN_EXECUTABLE_CACHE", "")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
