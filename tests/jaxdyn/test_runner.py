"""The model runner: bucketed shapes compiled once at warm-up, the cache donated and written in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.hf import load_hf_checkpoint
from jaxdyn.engine.compilation import CompiledAfterWarmupError, compilation_count
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork, powers_of_two
from jaxdyn.parallel.sharding import make_mesh
from tests.support import make_hf_checkpoint

CFG = RunnerConfig(num_pages=96, page_size=16, max_num_batched_tokens=64, max_num_seqs=8,
                   max_model_len=128, fail_on_compile=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("qwen3")))
    mesh = make_mesh(1)
    return mesh, load_hf_checkpoint(path, mesh, dtype=jnp.float32)


@pytest.fixture(scope="module")
def warm_runner(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, CFG)
    runner.warmup()
    return runner


def test_bucket_lists_are_explicit_powers_of_two():
    assert powers_of_two(16, 64) == (16, 32, 64)
    assert powers_of_two(1, 6) == (1, 2, 4, 6)
    tokens, pages = CFG.buckets()
    assert tokens == (16, 32, 64) and pages == (4, 8)
    assert [CFG.seqs_for(t) for t in tokens] == [8, 8, 8]


def test_steps_of_many_sizes_after_warmup_compile_nothing(warm_runner):
    rng = np.random.default_rng(0)
    before = compilation_count()
    free = list(range(CFG.num_pages))
    shapes = set()
    for _ in range(40):
        num_seqs = int(rng.integers(1, CFG.max_num_seqs + 1))
        budget = CFG.max_num_batched_tokens
        work = []
        for i in range(num_seqs):
            remaining = budget - (num_seqs - i - 1)
            n = int(rng.integers(1, max(2, min(remaining, 24))))
            budget -= n
            cached = int(rng.integers(0, CFG.max_model_len - n))
            num_pages = -(-(cached + n) // CFG.page_size)
            pages = rng.choice(free, size=num_pages, replace=False).tolist()
            work.append(SequenceWork(rng.integers(0, 256, n).tolist(), cached, pages))
        out = warm_runner.step(work)
        assert out.next_token_ids.shape == (num_seqs,)
        shapes.add((sum(len(w.token_ids) for w in work), num_seqs))
    assert len(shapes) > 20, "the sizes should vary"
    assert compilation_count() == before


def test_a_compilation_after_warmup_raises(warm_runner):
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))          # something compiles while serving
    with pytest.raises(CompiledAfterWarmupError):
        warm_runner.step([SequenceWork([1, 2, 3], 0, [0])])


def test_kv_cache_is_donated_and_updated_in_place(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, CFG)
    k_before, v_before = runner.kv_cache[0]
    pointer = k_before.addressable_shards[0].data.unsafe_buffer_pointer()
    runner.step([SequenceWork(list(range(20)), 0, [3, 9])])
    k_after = runner.kv_cache[0][0]
    assert k_before.is_deleted() and v_before.is_deleted()
    assert k_after.addressable_shards[0].data.unsafe_buffer_pointer() == pointer
    k = np.asarray(k_after)
    # The 20 tokens went to page 3 (16 slots) then page 9 (4 slots); padding wrote nothing.
    assert np.all(np.any(k[:, 3] != 0, axis=-1))
    assert np.all(np.any(k[:, 9, :4] != 0, axis=-1)) and np.all(k[:, 9, 4:] == 0)
    touched = {3, 9}
    assert all(np.all(k[:, p] == 0) for p in range(CFG.num_pages) if p not in touched)


@pytest.mark.parametrize("work,message", [
    ([SequenceWork(list(range(70)), 0, list(range(5)))], "tokens per step=70 exceeds"),
    ([SequenceWork([1], 0, [0])] * 9, "9 sequences exceed max_num_seqs=8"),
    ([SequenceWork([1] * 20, 0, [0])], "1 pages cannot hold 20 tokens"),
    ([SequenceWork([1], 0, [96])], "page id out of range"),
    ([SequenceWork([], 0, [0])], "no tokens"),
    ([], "at least one sequence"),
])
def test_bad_steps_are_refused_with_a_reason(warm_runner, work, message):
    with pytest.raises(ValueError, match=message):
        warm_runner.step(work)
