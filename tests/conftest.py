"""Test set-up: 8 virtual CPU devices for tensor-parallel tests, float32 parity settings."""

import os

# Must be set before jax initialises its CPU backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

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
