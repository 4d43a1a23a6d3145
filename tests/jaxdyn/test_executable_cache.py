"""The executable cache: warm-up saves the compiled steps and a later runner of the same fingerprint
loads them (nothing traced or compiled) and computes the same tokens; anything that changes the
executable changes the fingerprint; a file that cannot be loaded is compiled again and rewritten."""

import contextlib
import dataclasses
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.hf import load_hf_checkpoint
from jaxdyn.engine import executable_cache
from jaxdyn.engine.compilation import compilation_count
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork
from jaxdyn.engine.sampler import VARIANTS
from jaxdyn.engine.sampling_params import SamplingParams
from jaxdyn.parallel.sharding import make_mesh
from serving.cli import main
from tests.support import make_hf_checkpoint

CFG = RunnerConfig(num_pages=32, page_size=16, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64,
                   token_buckets=(16,), page_buckets=(4,), fail_on_compile=True)
STEPS = len(VARIANTS)     # one (tokens, pages) shape x the sampler variants


@contextlib.contextmanager
def jax_cache(directory):
    """JAX's persistent compilation cache in ``directory`` (None: off) for the block, then as it was."""
    import jax
    from jax._src import compilation_cache
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    was = {n: getattr(jax.config, n) for n in names}
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        for n, v in zip(names, (True, str(directory), 0)):
            jax.config.update(n, v)
    compilation_cache.reset_cache()          # JAX decides once whether its cache is used: ask again
    try:
        yield
    finally:
        for n, v in was.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def without_jax_cache():
    """These tests save executables: on the CPU that is done only with JAX's persistent cache off (the test
    run turns it on in conftest)."""
    with jax_cache(None):
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_hf_checkpoint("llama3.1", str(tmp_path_factory.mktemp("llama")))
    mesh = make_mesh(1)
    return mesh, load_hf_checkpoint(path, mesh, dtype=jnp.float32)


def _runner(model, directory, **changes):
    mesh, m = model
    return ModelRunner(m.graphdef, m.state, mesh, dataclasses.replace(CFG, executable_cache_dir=str(directory),
                                                                      **changes))


def _tokens(runner) -> list:
    """Steps of every sampler variant (greedy, random, plain, full) in turn: their tokens, and full's logprobs."""
    steps = [[SequenceWork([5, 6, 7], 0, [0])],                                                     # greedy
             [SequenceWork([5, 6, 7], 0, [0]),
              SequenceWork([9, 3], 0, [1], params=SamplingParams(temperature=0.8, seed=3), seed=3)],  # random
             [SequenceWork([5, 6, 7], 0, [2], params=SamplingParams(temperature=0.7, top_p=0.9, seed=1), seed=1)],
             [SequenceWork([9, 3, 4], 0, [3], params=SamplingParams(temperature=0, logprobs=2))]]      # full
    out, variants = [], []
    for work in steps:
        handle = runner.execute(work)
        variants.append(handle.variant)
        res = handle.result()
        out += [int(t) for t in res.next_token_ids]
    assert variants == ["greedy", "random", "plain", "full"], variants
    return out + [round(float(x), 5) for x in np.asarray(res.logprobs).ravel()]


def _files(directory) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs)


def test_a_second_runner_loads_every_step_compiles_none_and_computes_the_same(model, tmp_path):
    first = _runner(model, tmp_path)
    c0 = compilation_count()
    first.warmup()
    assert compilation_count() - c0 >= STEPS and first.executables_loaded == 0
    files = _files(tmp_path)
    assert len(files) == STEPS and all(f.endswith(".jaxexec") for f in files)
    want = _tokens(first)

    second = _runner(model, tmp_path)
    c0 = compilation_count()
    second.warmup()
    assert second.executables_loaded == STEPS
    assert compilation_count() - c0 <= 1          # the page-copy step only (not cached: small, lowered in ms)
    assert _tokens(second) == want                 # every variant's executable, loaded, alike
    assert _files(tmp_path) == files


@pytest.mark.parametrize("mode, value", [("separate_sampler", True), ("sampler_switch", True),
                                         ("sampler_switch", "plain_full")])
def test_the_parts_of_a_model_compiled_once_a_bucket_are_saved_and_loaded(model, tmp_path, mode, value):
    # separate_sampler: a forward a bucket and a sampler a bucket and variant, each its own file;
    # sampler_switch: one file a bucket, every variant's steps served by it; "plain_full": that and greedy's and
    # random's steps
    first = _runner(model, tmp_path, **{mode: value})
    first.warmup()
    names = sorted(os.path.basename(f) for f in _files(tmp_path))
    shapes = first.bucket_shapes()
    if mode == "separate_sampler":
        assert len(names) == len(shapes) * (1 + len(VARIANTS))
        assert sum(n.startswith("forward-") for n in names) == len(shapes)
    else:
        own = () if value is True else ("greedy", "random")        # plain_full: their steps stay their own
        steps = [f"step-t{t}-p{p}-{v}.jaxexec" for t, _, p in shapes for v in own]
        assert names == sorted([f"switch-t{t}-p{p}.jaxexec" for t, _, p in shapes] + steps)
    assert first.executables_loaded == 0
    want = _tokens(first)
    second = _runner(model, tmp_path, **{mode: value})
    c0 = compilation_count()
    second.warmup()
    assert second.executables_loaded == len(names) and compilation_count() - c0 <= 1
    assert _tokens(second) == want
    assert want == _tokens(_runner(model, tmp_path / "one"))   # the one-executable-a-variant steps draw the same


@pytest.mark.parametrize("change", [dict(num_pages=48), dict(max_num_seqs=2), dict(return_logits=True),
                                    dict(separate_sampler=True), dict(sampler_switch=True),
                                    dict(sampler_switch="plain_full")])
def test_what_changes_the_executable_changes_the_fingerprint(model, tmp_path, change):
    base = _runner(model, tmp_path)
    other = _runner(model, tmp_path, **change)
    assert base.executable_cache().key != other.executable_cache().key
    # settings that do not change the executables do not change it
    same = _runner(model, tmp_path, fail_on_compile=False, warmup_threads=3)
    assert same.executable_cache().key == base.executable_cache().key
    base.warmup()
    other.warmup()
    assert other.executables_loaded == 0 and len(os.listdir(tmp_path)) == 2


def test_a_file_that_cannot_be_loaded_is_compiled_again_and_rewritten(model, tmp_path, caplog):
    first = _runner(model, tmp_path)
    first.warmup()
    want = _tokens(first)
    victim = _files(tmp_path)[0]
    with open(victim, "wb") as f:
        f.write(b"not an executable")
    second = _runner(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxdyn.engine.executable_cache"):
        second.warmup()
    assert second.executables_loaded == STEPS - 1
    assert any("cannot be loaded" in r.getMessage() for r in caplog.records)
    assert _tokens(second) == want
    third = _runner(model, tmp_path)
    third.warmup()
    assert third.executables_loaded == STEPS          # rewritten by the second runner


def test_the_default_directory_follows_the_environment(monkeypatch, tmp_path):
    import jax
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        monkeypatch.delenv("JAXDYN_EXECUTABLE_CACHE", raising=False)
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert executable_cache.default_directory() == str(tmp_path / "xdg" / "jaxdyn" / "executables")
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert executable_cache.default_directory() == str(tmp_path / "home" / ".cache" / "jaxdyn" / "executables")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
        assert executable_cache.default_directory() == str(tmp_path / "jax" / "jaxdyn-executables")
        monkeypatch.setenv("JAXDYN_EXECUTABLE_CACHE", str(tmp_path / "mine"))
        assert executable_cache.default_directory() == str(tmp_path / "mine")
        monkeypatch.setenv("JAXDYN_EXECUTABLE_CACHE", "")
        assert executable_cache.default_directory() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_the_cli_refuses_a_cache_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["bench", "offline", "--executable-cache", str(f), "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--executable-cache {f}: not a directory" in err and "Traceback" not in err


def test_prune_keeps_the_most_recently_used_fingerprints_and_nothing_else_is_touched(tmp_path):
    names = [f"{i:032x}" for i in range(6)]
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step.jaxexec").write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "notes").mkdir()
    (tmp_path / ("f" * 32)).write_text("a file with a fingerprint's name")
    os.utime(tmp_path / "notes", (1, 1))
    assert sorted(executable_cache.prune(str(tmp_path), keep=4)) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:] + ["notes", "f" * 32])
    assert executable_cache.prune(str(tmp_path / "missing")) == []


def test_a_new_fingerprint_prunes_the_oldest_and_a_hit_counts_as_use(model, tmp_path):
    old = [f"{i:032x}" for i in range(executable_cache.KEEP_FINGERPRINTS)]
    for i, name in enumerate(old):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    first = _runner(model, tmp_path)
    first.warmup()
    key = first.executable_cache().key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old[1:] + [key])
    os.utime(tmp_path / key, (1, 1))          # older than all the others now
    again = _runner(model, tmp_path)
    again.warmup()
    assert again.executables_loaded == STEPS and os.stat(tmp_path / key).st_mtime > 2000


def test_on_the_cpu_with_jax_s_cache_on_nothing_is_saved_and_steps_run(model, tmp_path):
    """An executable JAX's cache loaded cannot be serialized and loaded again on the CPU (it fails when it
    runs): with that cache on, warm-up saves nothing there, and a runner whose steps JAX's cache served
    computes what a runner that compiled them does."""
    base = _runner(model, tmp_path / "off")          # JAX's cache off (the fixture): compiled and saved
    base.warmup()
    assert len(_files(tmp_path / "off")) == STEPS
    want = _tokens(base)
    import jax.monitoring
    hits = []

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)
    jax.monitoring.register_event_listener(on_event)
    try:
        _jax_cache_serves(model, tmp_path, want, hits)
    finally:
        jax.monitoring.unregister_event_listener(on_event)


def _jax_cache_serves(model, tmp_path, want, hits):
    with jax_cache(tmp_path / "jax"):
        assert executable_cache.jax_cache_in_use()
        for name in ("compiles", "served by JAX's cache"):
            hits.clear()
            runner = _runner(model, tmp_path / name)
            runner.warmup()
            assert runner.executables_loaded == 0
            # the first runner's steps compiled (nothing in JAX's cache yet), the second's read from it
            assert (len(hits) >= STEPS) if name == "served by JAX's cache" else not hits, (name, len(hits))
            assert not os.path.exists(tmp_path / name) or _files(tmp_path / name) == [], name
            assert _tokens(runner) == want, name
        assert os.listdir(tmp_path / "jax")               # JAX's cache kept the compilations
        later = _runner(model, tmp_path / "served by JAX's cache")     # a later start: it runs
        later.warmup()
        assert _tokens(later) == want
