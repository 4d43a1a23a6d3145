"""The engine's process-wide XLA option: SKIP_TEMP command-buffer updates on a GPU, set before JAX's backend."""

import os
import subprocess
import sys

from jaxdyn.engine import xla_options
from jaxdyn.engine.xla_options import command_buffer_update_mode

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
    code = ("import jaxdyn.engine.llm as L, jaxdyn.engine.xla_options as X\n"
            "seen = []\n"
            "L.command_buffer_update_mode = lambda: seen.append(X._backends_started())\n"
            "from jaxdyn import EngineConfig\n"
            "L.build_engine('tiny', load_format='dummy', warmup=False,\n"
            "               config=EngineConfig(num_pages=64, max_num_seqs=2, max_model_len=128))\n"
            "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False]"
