"""The engine's process-wide XLA option: SKIP_TEMP command-buffer updates on a GPU, set before JAX's backend."""

import os
import subprocess
import sys

from jaxdyn.engine import xla_options
import pytest

from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction

GPU = dict(jaxlib_version=(0, 11, 2), cuda_plugin=True, backends_started=False)
FLAG = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"


def test_added_on_a_gpu_before_the_backend_starts():
    env = {}
    assert command_buffer_update_mode(env, **GPU) == "SKIP_TEMP"
    assert env["XLA_FLAGS"] == FLAG
    env = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=", "JAX_PLATFORMS": "cuda,cpu"}
    assert command_buffer_update_mode(env, **GPU) == "SKIP_TEMP"
    assert env["XLA_FLAGS"] == f"--xla_gpu_enable_command_buffer= {FLAG}"
    env = {"JAX_PLATFORMS": "gpu"}
    assert command_buffer_update_mode(env, **GPU) == "SKIP_TEMP"


def test_a_mode_in_a_flagfile_is_the_users(tmp_path):
    mine = tmp_path / "flags"
    mine.write_text("--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE\n")
    other = tmp_path / "other"
    other.write_text("--xla_gpu_enable_command_buffer=\n")
    for flags, added in ((f"--flagfile={mine}", False), (f"--flagfile={tmp_path / 'missing'}", False),
                         (f"--flagfile={other}", True)):
        env = {"XLA_FLAGS": flags}
        assert (command_buffer_update_mode(env, **GPU) == "SKIP_TEMP") is added, flags
        assert (FLAG in env["XLA_FLAGS"]) is added


def test_left_alone_where_it_does_not_apply():
    cases = [
        ({"XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"}, GPU),   # the user's choice
        ({"JAX_PLATFORMS": "cpu"}, GPU),                                               # JAX kept off the GPU
        ({}, dict(GPU, jaxlib_version=(0, 10, 2))),       # 0.10 refuses the value: XLA would abort the process
        ({}, dict(GPU, jaxlib_version=None)),
        ({}, dict(GPU, cuda_plugin=False)),
        ({}, dict(GPU, backends_started=True)),            # too late: XLA has read XLA_FLAGS already
    ]
    for env, kw in cases:
        before = dict(env)
        assert command_buffer_update_mode(env, **kw) is None, (env, kw)
        assert env == before


def test_versions_and_backend_state_read_from_this_process(monkeypatch):
    monkeypatch.setattr(xla_options.importlib.metadata, "version",
                        lambda d: {"jaxlib": "0.11.0.dev20261101"}[d])
    assert xla_options._version("jaxlib") == (0, 11, 0)
    import jax
    jax.devices()
    assert xla_options._backends_started()
    env = {}
    assert command_buffer_update_mode(env, cuda_plugin=True) is None and env == {}


def test_build_engine_sets_it_before_the_backend_starts():
    # both options, the memory fraction with the engine's own setting
    code = ("import jaxdyn.engine.llm as L, jaxdyn.engine.xla_options as X\n"
            "seen = []\n"
            "L.command_buffer_update_mode = lambda: seen.append(X._backends_started())\n"
            "L.gpu_memory_fraction = lambda f: seen.append((f, X._backends_started()))\n"
            "from jaxdyn import EngineConfig\n"
            "L.build_engine('tiny', load_format='dummy', warmup=False,\n"
            "               config=EngineConfig(num_pages=64, max_num_seqs=2, max_model_len=128,\n"
            "                                   gpu_memory_utilization=0.6))\n"
            "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, (0.6, False)]"


MEM = dict(cuda_plugin=True, backends_started=False)


def test_gpu_memory_fraction_set_before_the_backend_starts():
    env = {}
    assert gpu_memory_fraction(None, env, **MEM) == 0.9 and env == {"XLA_CLIENT_MEM_FRACTION": "0.9"}   # vLLM's
    # the environment's own stands, as written (a value JAX cannot read is JAX's to refuse, by name)
    for env in ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.85"}, {"XLA_CLIENT_MEM_FRACTION": "most"}):
        before = dict(env)
        assert gpu_memory_fraction(None, env, **MEM) is None and env == before
    # a value given replaces the environment's, under JAX's name only (both names set is an error in JAX)
    for env in ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.85"}, {"XLA_CLIENT_MEM_FRACTION": "0.3"}, {}):
        assert gpu_memory_fraction(0.5, env, **MEM) == 0.5 and env == {"XLA_CLIENT_MEM_FRACTION": "0.5"}


def test_gpu_memory_fraction_where_it_cannot_apply():
    for env, kw in (({"JAX_PLATFORMS": "cpu"}, MEM), ({}, dict(MEM, cuda_plugin=False))):
        assert gpu_memory_fraction(0.5, env, **kw) is None and "XLA_CLIENT_MEM_FRACTION" not in env
    started = dict(MEM, backends_started=True)
    env = {}
    assert gpu_memory_fraction(None, env, **started) is None and env == {}
    assert gpu_memory_fraction(0.75, env, **started) is None         # what JAX started with: nothing to change
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.5: JAX's backend has already started .* 0.75"):
        gpu_memory_fraction(0.5, env, **started)
    env = {"XLA_CLIENT_MEM_FRACTION": "0.6"}
    assert gpu_memory_fraction(0.6, env, **started) is None
    with pytest.raises(ValueError, match="with 0.6 of each GPU's memory"):
        gpu_memory_fraction(0.9, env, **started)
    assert env == {"XLA_CLIENT_MEM_FRACTION": "0.6"}


def test_gpu_memory_utilization_checked_and_one_for_a_disaggregated_process():
    from jaxdyn import EngineConfig
    from jaxdyn.engine.llm import build_disagg_engine
    for bad in (0, 1.5, -0.1, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match="gpu_memory_utilization: expected a number in"):
            EngineConfig(gpu_memory_utilization=bad)
    assert EngineConfig(gpu_memory_utilization=1).gpu_memory_utilization == 1
    with pytest.raises(ValueError, match=r"share one process's JAX.*\[0.5, 0.8\]"):
        build_disagg_engine("tiny", prefill_devices=[0], decode_devices=[1], load_format="dummy",
                            prefill_config=EngineConfig(gpu_memory_utilization=0.8),
                            config=EngineConfig(gpu_memory_utilization=0.5))
