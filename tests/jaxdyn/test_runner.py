"""The model runner: bucketed shapes compiled once at warm-up in every sampler variant, the step's
variant picked from its rows, the cache donated and written in place."""

import collections
import itertools
import dataclasses
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints.hf import load_hf_checkpoint
from jaxdyn.engine.compilation import CompiledAfterWarmupError, compilation_count
from jaxdyn.engine.llm import describe_compile
from jaxdyn.engine.runner import ModelRunner, RunnerConfig, SequenceWork, powers_of_two, switched_variants
from jaxdyn.engine.sampler import FULL, GREEDY, PLAIN, RANDOM, VARIANTS, serves
from jaxdyn.engine.sampling_params import SamplingParams
from jaxdyn.parallel.sharding import make_mesh
from tests.support import constant_filled_buffers, lowered_count, make_hf_checkpoint

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


def test_a_compilation_after_warmup_raises(warm_runner, monkeypatch):
    real = warm_runner._pack

    def pack_and_compile(*a, **k):                         # something compiles inside a step
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))
        return real(*a, **k)
    monkeypatch.setattr(warm_runner, "_pack", pack_and_compile)
    with pytest.raises(CompiledAfterWarmupError):
        warm_runner.step([SequenceWork([1, 2, 3], 0, [0])])
    monkeypatch.undo()
    # what compiles elsewhere (another engine of the process, on its own thread) is not this runner's
    import threading
    t = threading.Thread(target=lambda: jax.jit(lambda x: x * 5 + 2)(jnp.arange(9)))
    t.start()
    t.join()
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


def test_the_step_takes_the_weights_as_flat_leaves_and_execute_draws_what_prepare_s_arrays_draw(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, CFG)
    leaves = jax.tree.leaves(model.state)
    assert type(runner.state) is tuple and len(runner.state) == len(leaves)
    assert all(a is b for a, b in zip(runner.state, leaves))
    assert jax.tree.structure(jax.tree.unflatten(runner.state_treedef, runner.state)) == \
        jax.tree.structure(model.state)
    work = [SequenceWork(list(range(1, 20)), 0, [3, 9]), SequenceWork([5, 6, 7], 0, [4])]
    ids = runner.execute(work).result().next_token_ids
    # The same step from the device arrays prepare() gives (what the GPU benchmarks call back to back),
    # on a fresh runner: host buffers passed straight to the executable draw the same tokens.
    other = ModelRunner(model.graphdef, model.state, mesh, CFG)
    compiled, args, _ = other.prepare(work)
    assert all(isinstance(a, jax.Array) for a in args)
    out = compiled(other.state, other.kv_cache, other.token_pages, other.prev_sampled, *args)
    np.testing.assert_array_equal(np.asarray(out[2])[:2], ids)


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


# ---- sampler variants --------------------------------------------------------------------------

VARIANT_CFG = RunnerConfig(num_pages=32, page_size=16, max_num_batched_tokens=64, max_num_seqs=8,
                           max_model_len=64, token_buckets=(16, 64), page_buckets=(4,), fail_on_compile=True)


@pytest.fixture(scope="module")
def variant_runner(loaded):
    """A warm runner of two buckets, and the compilations its warm-up made."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, VARIANT_CFG)
    before = compilation_count()
    runner.warmup()
    return runner, compilation_count() - before


def test_warmup_compiles_every_bucket_in_every_sampler_variant(variant_runner):
    runner, compiled = variant_runner
    assert len(runner.bucket_shapes()) == 2
    assert compiled == 2 * len(VARIANTS) + 1          # + the page copy


@pytest.mark.parametrize("first_alone", [True, False])
def test_warmup_on_several_threads_compiles_each_executable_once_and_steps_alike(
        loaded, variant_runner, monkeypatch, first_alone):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(VARIANT_CFG, warmup_threads=3, first_compiles_alone=first_alone))
    assert runner.warmup_threads() == 3
    traced = []
    model_class = type(nnx.merge(model.graphdef, model.state))
    forward = model_class.__call__
    monkeypatch.setattr(model_class, "__call__",
                        lambda self, *a, **k: traced.append(a[1].shape) or forward(self, *a, **k))
    compiled_on = []
    compile_step = runner.compile
    monkeypatch.setattr(runner, "compile",
                        lambda lowered, tokens: compiled_on.append((threading.current_thread().name, tokens))
                        or compile_step(lowered, tokens))
    before = compilation_count()
    runner.warmup()
    assert compilation_count() - before == 2 * len(VARIANTS) + 1
    # each shape's first variant alone on one thread, or every step on the pool's threads
    pools = collections.Counter(name.rsplit("_", 1)[0] for name, _ in compiled_on)
    # each compiled with its bucket's token count (the XLA options per bucket, ``compiler_options``)
    assert collections.Counter(t for _, t in compiled_on) == {t: len(VARIANTS) for t, _, _ in runner.bucket_shapes()}
    assert pools == ({"jaxdyn-warmup-first": 2, "jaxdyn-warmup": 2 * len(VARIANTS) - 2} if first_alone
                     else {"jaxdyn-warmup": 2 * len(VARIANTS)})
    # the sampler variants of a shape share one trace of the model
    assert sorted(traced) == sorted((t,) for t, _, _ in runner.bucket_shapes())
    # what the compilation cost, part by part: every part lowered and compiled, XLA's seconds summed by bucket
    summary = runner.compile_summary()
    assert summary["parts"] == 2 * len(VARIANTS) and summary["threads"] == 3
    assert set(runner.compile_seconds) == set(runner._parts)
    assert all(lo > 0 and c > 0 for lo, c in runner.compile_seconds.values())
    assert summary["compile_s"] == pytest.approx(sum(c for _, c in runner.compile_seconds.values()), abs=0.02)
    assert summary["compile_max_s"] == pytest.approx(runner.compile_seconds[summary["slowest"]][1], abs=0.01)
    assert sorted(summary["by_tokens"]) == sorted(t for t, _, _ in runner.bucket_shapes())
    assert 0 < summary["wall_s"] and summary["lower_s"] < summary["wall_s"]
    assert describe_compile(summary).startswith(f"compiled {2 * len(VARIANTS)} executables on 3 threads in ")
    assert set(runner._compiled) == set(variant_runner[0]._compiled)
    work = [SequenceWork(token_ids=[5, 6, 7], num_computed=0, page_ids=[0]),
            SequenceWork(token_ids=list(range(20, 40)), num_computed=0, page_ids=[1, 2])]
    before = compilation_count()
    got = runner.step(work).next_token_ids
    assert compilation_count() == before
    np.testing.assert_array_equal(got, variant_runner[0].step(work).next_token_ids)


GREEDY_P = SamplingParams(temperature=0, max_tokens=None)
KINDS = {   # name: (params, banned ids)
    "greedy": (GREEDY_P, ()),
    "banned": (GREEDY_P, (7, 100, 255)),
    "seeded": (SamplingParams(temperature=0.8, max_tokens=None), ()),
    "seeded-banned": (SamplingParams(temperature=1.2, max_tokens=None), (3, 4)),
    "top-k": (SamplingParams(temperature=1.0, top_k=20, max_tokens=None), ()),
    "top-p-min-p": (SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, max_tokens=None), ()),
    "penalties": (SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5,
                                 frequency_penalty=0.5, max_tokens=None), ()),
    "logprobs": (SamplingParams(temperature=0.7, logprobs=5, max_tokens=None), ()),
    "greedy-logprobs": (SamplingParams(temperature=0, logprobs=0, max_tokens=None), ()),
    "greedy-top-k": (SamplingParams(temperature=0, top_k=5, max_tokens=None), ()),  # no draw: no filter
}
OWN_VARIANT = {"greedy": GREEDY, "banned": GREEDY, "greedy-top-k": GREEDY, "seeded": RANDOM,
               "seeded-banned": RANDOM, "top-k": PLAIN, "top-p-min-p": PLAIN, "penalties": PLAIN,
               "logprobs": FULL, "greedy-logprobs": FULL}


@pytest.mark.parametrize("kinds, want", [
    ((None,), GREEDY), (("greedy", "banned", "greedy-top-k"), GREEDY),
    (("seeded",), RANDOM), (("greedy", "seeded-banned", "banned"), RANDOM),
    (("greedy", "top-k"), PLAIN), (("seeded", "top-p-min-p"), PLAIN), (("penalties",), PLAIN),
    (("top-k", "penalties", "banned"), PLAIN),
    (("greedy-logprobs", "greedy"), FULL), (("seeded", "logprobs", "banned"), FULL),
])
def test_a_step_runs_the_cheapest_variant_its_rows_need(variant_runner, kinds, want):
    runner, _ = variant_runner
    work = [SequenceWork([5 + i, 6, 7], 0, [i], params=None if k is None else KINDS[k][0],
                         banned=() if k is None else KINDS[k][1]) for i, k in enumerate(kinds)]
    handle = runner.execute(work)
    assert handle.variant == want
    out = handle.result()
    wants_logprobs = any(k is not None and KINDS[k][0].logprobs is not None for k in kinds)
    assert (out.logprobs is not None) == wants_logprobs
    assert all(OWN_VARIANT[k] == want or serves(want, OWN_VARIANT[k]) for k in kinds if k is not None)


def test_a_variant_cheaper_than_the_step_needs_is_refused(variant_runner):
    runner, _ = variant_runner
    work = [SequenceWork([1, 2], 0, [0], params=KINDS["seeded"][0])]
    with pytest.raises(ValueError, match="variant 'greedy' cannot serve this step \\(it needs 'random'\\)"):
        runner.prepare(work, GREEDY)
    assert runner.execute(work, FULL).variant == FULL


def _generate(runner, kinds, variant=None, steps=5):
    """Prefill one prompt per kind in one step, then decode ``steps - 1`` tokens (fed back from
    the host); row i in pages 2i, 2i+1. Returns per row the tokens, per row the (logprob, top 5)
    of each step where it asked for logprobs, and the variants the steps ran."""
    work = []
    for i, k in enumerate(kinds):
        params, banned = KINDS[k]
        kind = sorted(KINDS).index(k)                  # a row's prompt and seed follow its kind only
        prompt = np.random.default_rng(kind).integers(0, 256, 6 + kind % 5).tolist()
        work.append(SequenceWork(prompt, 0, [2 * i, 2 * i + 1], params=params, prompt_len=len(prompt),
                                 seed=1000 + kind, banned=banned))
    tokens, logprobs, used = [[] for _ in kinds], [[] for _ in kinds], set()
    for step in range(steps):
        handle = runner.execute(work, variant)
        out = handle.result()
        used.add(handle.variant)
        for i, w in enumerate(work):
            tokens[i].append(int(out.next_token_ids[i]))
            if w.params.logprobs is not None:
                logprobs[i].append((out.logprobs[i], out.top_ids[i, :5], out.top_logprobs[i, :5]))
        work = [dataclasses.replace(w, token_ids=[tokens[i][-1]], num_computed=w.num_computed + len(w.token_ids),
                                    output_index=step + 1) for i, w in enumerate(work)]
    return tokens, logprobs, used


def _assert_same_draws(runner, one, kinds_list, steps=5) -> None:
    """``runner`` draws the tokens, and the logprobs (to 1e-5), that ``one`` draws for each of ``kinds_list``, and
    its steps report the same variants."""
    for kinds in kinds_list:
        tokens, logprobs, used = _generate(runner, kinds, steps=steps)
        want, want_lps, want_used = _generate(one, kinds, steps=steps)
        assert tokens == want and used == want_used, kinds
        for a, b in zip(logprobs, want_lps):
            for (lp, ids, top), (lp1, ids1, top1) in zip(a, b, strict=True):
                assert np.isclose(lp, lp1, atol=1e-5) and np.array_equal(ids, ids1)
                np.testing.assert_allclose(top, top1, atol=1e-5)


@pytest.mark.parametrize("mode", [True, "except_greedy"])
def test_a_separate_sampler_compiles_the_model_once_a_bucket_and_draws_what_one_executable_draws(
        loaded, variant_runner, mode):
    """``separate_sampler``: warm-up compiles a forward a bucket and a sampler a bucket and variant (2 + 2 x 3
    + the page copy, against 2 x 3 + 1 whole steps); "except_greedy": the greedy steps whole, a forward a bucket
    and the other variants' samplers (2 + 2 + 2 x 2 + 1); every kind of row, in its own variant and in a mixed
    step, draws the tokens and logprobs the one-executable runner draws; nothing compiles after warm-up."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(VARIANT_CFG, separate_sampler=mode))
    before = compilation_count()
    runner.warmup()
    if mode is True:
        assert compilation_count() - before == 2 + 2 * len(VARIANTS) + 1
        assert sorted(k[0] for k in runner._parts) == ["forward"] * 2 + ["sample"] * 2 * len(VARIANTS)
    else:
        assert compilation_count() - before == 2 + 2 + 2 * (len(VARIANTS) - 1) + 1
        assert sorted(k[0] for k in runner._parts) == (["forward"] * 2 + ["sample"] * 2 * (len(VARIANTS) - 1)
                                                       + ["step"] * 2)
        assert all(k[3] == VARIANTS[0] for k in runner._parts if k[0] == "step")
        assert VARIANTS[0] not in {k[3] for k in runner._parts if k[0] == "sample"}
    one, _ = variant_runner
    before = compilation_count()
    _assert_same_draws(runner, one, (("greedy",), ("seeded",),
                                     ("greedy", "seeded-banned", "top-p-min-p", "penalties", "logprobs")))
    assert compilation_count() == before


def test_a_sampler_switch_compiles_one_executable_a_bucket_and_draws_what_the_variants_draw(loaded, variant_runner):
    """``sampler_switch``: warm-up compiles one step a bucket (2 + the page copy, against 2 x 3 + 1); each step
    still reports the cheapest variant its rows need, and every kind of row, alone and in a mixed step, draws the
    tokens and logprobs the variants' executables draw (its ``full`` branch filters and ranks without a sort);
    a costlier variant may still be asked for; nothing compiles after warm-up."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(VARIANT_CFG, sampler_switch=True))
    before = compilation_count()
    runner.warmup()
    assert compilation_count() - before == 2 + 1
    assert sorted(runner._parts) == sorted(("switch", t, p) for t, _, p in runner.bucket_shapes())
    assert len({id(c) for c in runner._compiled.values()}) == 2 and len(runner._compiled) == 2 * len(VARIANTS)
    one, _ = variant_runner
    before = compilation_count()
    _assert_same_draws(runner, one, (("greedy",), ("seeded",), ("top-k",),
                                     ("greedy", "seeded-banned", "top-p-min-p", "penalties", "logprobs",
                                      "greedy-logprobs", "banned")))
    # a greedy row run in the costlier variants' branches draws the same token
    for variant in VARIANTS:
        assert _generate(runner, ("greedy",), variant, steps=2)[0] == _generate(one, ("greedy",), steps=2)[0]
    assert compilation_count() == before


def test_a_plain_full_switch_keeps_greedy_and_random_steps_and_switches_the_others(loaded, variant_runner):
    """``sampler_switch="plain_full"``: warm-up compiles three executables a bucket (greedy's and random's steps,
    and one switched over plain and full: 2 x 3 + the page copy, against 2 x 4 + 1); the greedy and random steps
    are the default runner's programs; the switch holds one two-branch conditional and no sort; the host writes
    plain's index 0 and full's 1; every kind of row, alone and mixed, draws what the variants' executables draw;
    nothing compiles after warm-up."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(VARIANT_CFG, sampler_switch="plain_full"))
    before = compilation_count()
    runner.warmup()
    assert compilation_count() - before == 2 * 3 + 1
    shapes = [(t, p) for t, _, p in runner.bucket_shapes()]
    assert sorted(runner._parts) == sorted([("step", t, p, v) for t, p in shapes for v in (GREEDY, RANDOM)]
                                           + [("switch", t, p) for t, p in shapes])
    one, _ = variant_runner
    t, p = shapes[0]
    for variant in (GREEDY, RANDOM):
        assert runner.lower(t, p, variant).as_text() == one.lower(t, p, variant).as_text()
    text = runner._lower_part(("switch", t, p)).as_text()
    assert text.count("stablehlo.case") == 1 and "stablehlo.sort" not in text
    work = [SequenceWork([5, 6, 7], 0, [0]), SequenceWork([9, 3], 0, [1])]
    for variant, index in ((PLAIN, 0), (FULL, 1)):
        _, args, _ = runner.prepare(work, variant)
        assert np.asarray(args[1])[np.asarray(args[2]).shape[0], 0] == index
    before = compilation_count()
    _assert_same_draws(runner, one, (("greedy",), ("seeded",), ("top-k",), ("penalties",), ("logprobs",),
                                     ("greedy", "seeded-banned", "top-p-min-p", "penalties", "logprobs",
                                      "greedy-logprobs", "banned")))
    assert compilation_count() == before
    with pytest.raises(ValueError, match="pick one"):
        RunnerConfig(sampler_switch="plain_full", separate_sampler="except_greedy")


def test_the_sampler_switch_by_device():
    """``sampler_switch=None`` (the default): plain's and full's switch on a GPU, unless ``separate_sampler`` splits
    the steps; no switch elsewhere; a setting given is kept on either."""
    assert RunnerConfig().sampler_switch is None
    assert switched_variants(None, on_gpu=True) == (PLAIN, FULL)
    assert switched_variants(None, on_gpu=False) == ()
    assert switched_variants(None, on_gpu=True, separate_sampler="except_greedy") == ()
    assert switched_variants(False, on_gpu=True) == ()
    assert switched_variants(True, on_gpu=False) == VARIANTS
    assert switched_variants("plain_full", on_gpu=False) == (PLAIN, FULL)


def test_a_runner_on_a_gpu_switches_plain_and_full_by_default(loaded, monkeypatch):
    """A runner whose devices are GPUs (``on_gpu`` patched: the parts are only listed here) warms up greedy's and
    random's steps and one switch a bucket by default, the four variants' steps with ``separate_sampler``
    "except_greedy" split as before, and all four off; its CPU twin, the four variants' steps."""
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16,), page_buckets=(4,))
    cpu = ModelRunner(model.graphdef, model.state, mesh, cfg)
    assert cpu.part_keys() == [("step", 16, 4, v) for v in VARIANTS]
    monkeypatch.setattr(ModelRunner, "on_gpu", property(lambda self: True))
    gpu = ModelRunner(model.graphdef, model.state, mesh, cfg)
    assert gpu.part_keys() == [("step", 16, 4, GREEDY), ("step", 16, 4, RANDOM), ("switch", 16, 4)]
    split = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, separate_sampler="except_greedy"))
    assert "switch" not in {k[0] for k in split.part_keys()}
    off = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, sampler_switch=False))
    assert off.part_keys() == cpu.part_keys()


def test_a_sampler_switch_holds_one_conditional_and_no_sort(loaded):
    """The switched step lowered for a GPU: one ``stablehlo.case`` (the variants), and nothing that XLA would send
    to CUB or a top-k call outside its command buffers (a sort, a top-k); the variants' own steps do sort."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(VARIANT_CFG, token_buckets=(16,), page_buckets=(4,), sampler_switch=True))
    text = runner._lower_part(("switch", 16, 4)).as_text()
    assert text.count("stablehlo.case") == 1
    assert "stablehlo.sort" not in text and "top_k" not in text.lower() and "topk" not in text.lower()
    full = runner.lower(16, 4, FULL).as_text()
    assert "stablehlo.sort" in full or "top_k" in full.lower()
    with pytest.raises(ValueError, match="pick one"):
        RunnerConfig(sampler_switch=True, separate_sampler=True)
    with pytest.raises(ValueError, match="sampler_switch: expected true, false, 'plain_full' or none"):
        RunnerConfig(sampler_switch="yes")
    with pytest.raises(ValueError, match="sampler_switch: expected"):
        RunnerConfig(sampler_switch=1)


def test_a_sampler_switchs_branches_use_only_buffers_of_the_step(loaded):
    """In the compiled switched step no operand of the conditional is a parameter of the step and no output of the
    step is the conditional's own result: its branches read and write buffers of the step's own, at the same
    addresses every call (a recorded conditional's branches are re-recorded when a buffer they use moves)."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(VARIANT_CFG, token_buckets=(16,), page_buckets=(4,), sampler_switch=True))
    text = runner._lower_part(("switch", 16, 4)).compile().as_text()
    entry = text[text.index("ENTRY"):]
    defs = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.\-]+) = [^\n]*? (\w[\w-]*)\(", entry, flags=re.M))
    cond = re.search(r"^\s*(%[\w.\-]+) = .*? conditional\(([^)]*)\)", entry, flags=re.M)
    assert cond is not None
    tuples = [o.strip() for o in cond.group(2).split(",")[1:]]
    operands = []
    for t in tuples:
        line = re.search(rf"^\s*{re.escape(t)} = [^\n]*? tuple\(([^)]*)\)", entry, flags=re.M)
        operands += [o.strip() for o in line.group(1).split(",")]
    params = {name for name, op in defs.items() if op == "parameter"}
    assert len(operands) >= 8 and not set(operands) & params, operands
    gtes = {name for name in re.findall(rf"^\s*(%[\w.\-]+) = [^\n]*get-tuple-element\({re.escape(cond.group(1))}\)",
                                        entry, flags=re.M)}
    root = re.search(r"^\s*ROOT [^\n]*? tuple\(([^)]*)\)", entry, flags=re.M).group(1)
    assert len(gtes) == 4 and not gtes & {o.strip() for o in root.split(",")}


def test_a_sampler_switch_writes_each_variants_index_and_greedy_returns_zero_logprobs(loaded):
    """The host writes the variant's index where the switch reads it, for each variant (a wrong index would still
    draw the same tokens: a costlier branch serves every row), and the greedy branch returns its placeholders."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(VARIANT_CFG, token_buckets=(16,), page_buckets=(4,), sampler_switch=True))
    work = [SequenceWork([5, 6, 7], 0, [0]), SequenceWork([9, 3], 0, [1])]
    for i, variant in enumerate(VARIANTS):
        compiled, args, _ = runner.prepare(work, variant)
        seqi = np.asarray(args[1])
        assert seqi[np.asarray(args[2]).shape[0], 0] == i
        out = compiled(runner.state, runner.kv_cache, runner.token_pages, runner.prev_sampled, *args)
        runner.kv_cache, runner.token_pages = out[0], out[1]
        lps, top_ids, top_lps = (np.asarray(x) for x in out[3:6])
        if variant == FULL:
            assert np.all(lps[:2] < 0) and np.all(top_lps[:2, 0] < 0)      # log-probabilities
        else:
            assert not lps.any() and not top_ids.any() and not top_lps.any()


def test_a_sampler_switch_under_tensor_parallelism_gathers_the_logits_once(tmp_path):
    """TP 2: the logits are gathered before the switch (and before the sampled variants' samplers), so the samplers' reductions are not collectives inside the
    branches (a collective is not one of XLA's default command types: the conditional would leave the CUDA graph);
    the switched step holds about as many collectives as the greedy step (without the gather: 97 against 7); it
    draws what the variants' steps draw."""
    import re

    path = make_hf_checkpoint("qwen3", str(tmp_path))
    mesh = make_mesh(2, jax.devices()[:2])
    model = load_hf_checkpoint(path, mesh, dtype=jnp.float32)
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(64,), page_buckets=(4,))
    switch = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, sampler_switch=True))
    variants = ModelRunner(model.graphdef, model.state, mesh, cfg)
    collectives = re.compile(r"all-reduce(-start)?\(|all-gather(-start)?\(")
    switched = len(collectives.findall(switch._compile(64, 4, GREEDY).as_text()))
    greedy = len(collectives.findall(variants._compile(64, 4, GREEDY).as_text()))
    assert 0 < switched <= greedy + 1, (switched, greedy)
    # the sampled variants' own steps gather the logits once too (their penalties, filters and draw on whole rows)
    for variant in (RANDOM, PLAIN, FULL):
        sampled = len(collectives.findall(variants._compile(64, 4, variant).as_text()))
        assert sampled <= greedy + 1, (variant, sampled, greedy)
    _assert_same_draws(switch, variants, (("greedy",), ("greedy", "seeded-banned", "top-p-min-p", "penalties",
                                                         "logprobs")), steps=3)


def test_a_separate_sampler_returns_the_logits_one_executable_returns(loaded):
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16,), return_logits=True)
    work = [SequenceWork([3, 4, 5], 0, [0]), SequenceWork([7, 8], 0, [1])]
    outs = [ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, separate_sampler=s)).step(work)
            for s in (False, True)]
    assert outs[0].logits.shape == (2, model.config.vocab_size)
    np.testing.assert_allclose(outs[1].logits, outs[0].logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outs[1].next_token_ids, outs[0].next_token_ids)


def test_a_separate_sampler_donates_the_kv_cache_and_token_pages_and_returns_each_steps_logits(loaded):
    """The forward takes the KV cache and token pages donated and returns them in place with fresh logits; the
    sampler takes the token pages donated and returns them in place. With ``return_logits`` each step's logits
    are its own: a later step of the bucket, dispatched before they are read, leaves them intact."""
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16,), return_logits=True)
    one = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, separate_sampler=False))
    split = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, separate_sampler=True))
    first = [SequenceWork([3, 4, 5], 0, [0]), SequenceWork([7, 8], 0, [1])]
    second = [SequenceWork([6], 3, [0], prev_row=0), SequenceWork([9], 2, [1], prev_row=1)]
    want = [one.step(first), one.step(second)]
    split.warmup()
    handles = [split.execute(first), split.execute(second)]      # the second dispatched before the first is read
    got = [h.result() for h in handles]
    step = split._compiled[(16, split.page_buckets[0], VARIANTS[0])]
    kv_leaves = len(jax.tree.leaves(split.kv_cache))

    def aliased(compiled):
        header = next(line for line in compiled.as_text().splitlines() if line.startswith("HloModule"))
        return header.count("may-alias)") + header.count("must-alias)")
    assert aliased(step.forward) == kv_leaves + 1          # the KV cache, the token pages
    assert aliased(step.sample) == 1                       # the token pages
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logits, w.logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g.next_token_ids, w.next_token_ids)


def test_a_separate_sampler_moves_the_inputs_once_and_both_calls_take_them_on_the_device(loaded, monkeypatch):
    """A split step moves its three host buffers to the device once, and both calls take those same arrays: one
    transfer a step, as one executable makes. The forward returns none of them (an output passing an input through
    is a copy into a fresh buffer every call): its outputs are the KV cache, the token pages and the logits."""
    from jaxdyn.engine.runner import _SplitStep
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16,), separate_sampler=True)
    runner = ModelRunner(model.graphdef, model.state, mesh, cfg)
    seen = {}
    original = _SplitStep.__call__

    def spy(self, state, kv_cache, token_pages, prev_sampled, tok, seqi, seqf):
        forward, sample = self.forward, self.sample

        def record(part, fn, inputs):
            def call(*args):
                seen[part] = args[inputs]
                out = fn(*args)
                seen[part + " outputs"] = len(out)
                return out
            return call
        seen["host"] = (tok, seqi, seqf)
        self.forward = record("forward", forward, slice(4, 7))
        self.sample = record("sample", sample, slice(3, 6))
        try:
            return original(self, state, kv_cache, token_pages, prev_sampled, tok, seqi, seqf)
        finally:
            self.forward, self.sample = forward, sample

    monkeypatch.setattr(_SplitStep, "__call__", spy)
    out = runner.step([SequenceWork([3, 4, 5], 0, [0])])
    assert len(out.next_token_ids) == 1
    assert all(type(h) is np.ndarray for h in seen["host"])                  # the step gets host buffers
    assert all(isinstance(a, jax.Array) for a in seen["forward"])            # the forward, device arrays
    assert all(f is s for f, s in zip(seen["forward"], seen["sample"]))      # the sampler, the same ones
    for host, dev in zip(seen["host"], seen["forward"]):
        np.testing.assert_array_equal(np.asarray(dev), host)
    kv_leaves = len(jax.tree.leaves(runner.kv_cache))
    assert seen["forward outputs"] == 3                                      # KV cache, token pages, logits
    step = runner._compiled[(16, runner.page_buckets[0], VARIANTS[0])]
    assert len(jax.tree.leaves(step.forward.out_info)) == kv_leaves + 2      # the executable's outputs too


def test_a_separate_sampler_passes_the_token_pages_on_donated(loaded, monkeypatch):
    """The sampler's call takes the forward's token pages donated and returns them, and the next forward donates
    those: no buffer is read by one executable between two that donate it."""
    from jaxdyn.engine.runner import _SplitStep
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16,), separate_sampler=True)
    runner = ModelRunner(model.graphdef, model.state, mesh, cfg)
    given, returned = [], []
    original = _SplitStep.__call__

    def spy(self, *args):
        sample = self.sample

        def record(*a):
            given.append(a[0])
            out = sample(*a)
            returned.append(out[0])
            return out
        self.sample = record
        try:
            return original(self, *args)
        finally:
            self.sample = sample

    monkeypatch.setattr(_SplitStep, "__call__", spy)
    runner.step([SequenceWork([3, 4, 5], 0, [0])])
    assert given[0].is_deleted()                      # donated to the sampler's call
    assert runner.token_pages is returned[0]          # whose output the next forward takes
    assert np.asarray(runner.token_pages)[0, :3].tolist() == [3, 4, 5]
    runner.step([SequenceWork([6], 3, [0])])
    assert returned[0].is_deleted()                   # donated to that forward


@pytest.mark.parametrize("kinds", [("greedy", "banned", "greedy-top-k"), ("greedy", "seeded", "seeded-banned")])
def test_a_greedy_or_random_step_draws_what_plain_and_full_draw(variant_runner, kinds):
    runner, _ = variant_runner
    tokens, _, used = _generate(runner, kinds)
    assert used == {max((OWN_VARIANT[k] for k in kinds), key=VARIANTS.index)}
    assert _generate(runner, kinds, FULL)[0] == tokens
    assert _generate(runner, kinds, PLAIN)[0] == tokens
    if RANDOM not in used:
        assert _generate(runner, kinds, RANDOM)[0] == tokens


def test_every_row_of_a_mixed_step_draws_what_it_draws_alone(variant_runner):
    """Six kinds of rows in one ``full`` step, five steps on: each row's tokens (and logprobs) are
    those it gets alone in its own variant; a greedy row in a full step takes the argmax."""
    runner, _ = variant_runner
    kinds = ("greedy", "seeded-banned", "top-p-min-p", "penalties", "logprobs", "banned")
    tokens, logprobs, used = _generate(runner, kinds)
    assert used == {FULL}
    for i, k in enumerate(kinds):
        alone, alone_lps, alone_used = _generate(runner, (k,))
        assert alone_used == {OWN_VARIANT[k]}
        assert alone[0] == tokens[i], k
        # the model's logits of a row move with the step's shape by float rounding (GPU: 1e-4, TF32)
        for (lp, top_ids, top_lps), (lp1, top_ids1, top_lps1) in zip(logprobs[i], alone_lps[0], strict=True):
            assert np.isclose(lp, lp1, atol=1e-3) and np.array_equal(top_ids, top_ids1)
            assert np.allclose(top_lps, top_lps1, atol=1e-3)
    assert len(logprobs[kinds.index("logprobs")]) == 5


def test_no_step_variant_holds_a_conditional(variant_runner):
    """XLA's GPU conditional reads its predicate on the host (a sync every step): none in any variant,
    neither in the lowered step nor in the compiled one."""
    runner, _ = variant_runner
    work = [SequenceWork([1, 2, 3], 0, [0])]          # greedy: every variant may run it
    for v in VARIANTS:
        lowered = runner.lower(16, 4, v).as_text()
        assert "stablehlo.case" not in lowered and "stablehlo.if" not in lowered, v
        assert "conditional(" not in runner.prepare(work, v)[0].as_text(), v


def test_a_mixed_workload_after_warmup_compiles_nothing(variant_runner):
    runner, _ = variant_runner
    rng = np.random.default_rng(3)
    before = compilation_count()
    used = collections.Counter()
    for _ in range(30):
        num_seqs = int(rng.integers(1, VARIANT_CFG.max_num_seqs + 1))
        kinds = rng.choice(sorted(KINDS), num_seqs, p=None).tolist()
        draw = rng.random()
        if draw < 0.2:                                       # plenty of greedy-only, random and plain steps too
            kinds = [k for k in kinds if OWN_VARIANT[k] == GREEDY] or ["greedy"]
        elif draw < 0.35:
            kinds = [k for k in kinds if OWN_VARIANT[k] in (GREEDY, RANDOM)] or ["seeded"]
        elif draw < 0.6:
            kinds = [k for k in kinds if OWN_VARIANT[k] != FULL] or ["greedy"]
        work = []
        for i, k in enumerate(kinds):
            n = int(rng.integers(1, 64 // len(kinds) + 1))
            cached = int(rng.integers(0, 64 - n))
            pages = [4 * i + j for j in range(-(-(cached + n) // 16))]
            work.append(SequenceWork(rng.integers(0, 256, n).tolist(), cached, pages, params=KINDS[k][0],
                                     prompt_len=int(rng.integers(0, cached + 1)), seed=int(rng.integers(0, 2**32)),
                                     output_index=int(rng.integers(0, 20)), banned=KINDS[k][1]))
        handle = runner.execute(work)
        handle.result()
        used[handle.variant] += 1
    assert set(used) == set(VARIANTS) and min(used.values()) >= 3, used
    assert compilation_count() == before


def test_place_puts_chunks_first_then_fills_with_single_tokens():
    from jaxdyn.engine.runner import _place
    assert _place([1] * 40, (32, 16), 64) == [list(range(32)), list(range(32, 40))]
    assert _place([20, 1, 1, 15], (32, 16), 64) == [[0, 1, 2], [3]]     # 15 does not fit beside 20
    assert _place([20, 20], (32, 16), 64) is None
    assert _place([1] * 10, (8, 8), 4) is None                           # 4 sequences a call at most
    assert _place([1] * 10, (16, 16), 64) == [list(range(10))]           # the empty call is dropped


def test_plan_splits_a_step_only_where_the_smaller_buckets_cost_less(warm_runner):
    r = warm_runner
    assert r.token_buckets == (16, 32, 64) and not r.split_enabled()      # off on the CPU by default
    assert r.step_costs is None and r.plan([5] * 8) == [None]
    with pytest.raises(ValueError, match="buckets"):
        r.set_step_costs({16: 1.0})
    try:
        r.set_step_costs({16: 1.0, 32: 1.5, 64: 10.0})
        assert r.plan([5] * 8) == [list(range(6)), [6, 7]]                   # 32 + 16: 2.5 against 10
        assert r.plan([30, 30]) == [[0], [1]]                                # 32 + 32
        assert r.plan([1] * 8) == [None]                                     # the smallest bucket
        assert r.plan([40]) == [None]                                        # one row is never split
        r.set_step_costs({16: 2.0, 32: 5.0, 64: 5.5})
        assert r.plan([5] * 8) == [None]                         # 16 * 3 or 32 + 16 cost more than 64
    finally:
        r.set_step_costs(None)


def test_a_split_step_draws_what_the_whole_step_draws(loaded):
    """The same steps (prompt chunks, then decode tokens taken from the previous step's draws on the device,
    seeded sampling with logprobs) on two runners, one splitting each step into calls of smaller buckets:
    the same tokens, logprobs and KV pages."""
    mesh, model = loaded
    whole = ModelRunner(model.graphdef, model.state, mesh, CFG)
    split = ModelRunner(model.graphdef, model.state, mesh, CFG)
    split.set_step_costs({16: 1.0, 32: 1.5, 64: 10.0})
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=0.9, top_p=0.9, logprobs=3, seed=7)
    lens = [int(n) for n in rng.integers(2, 12, 5)]
    pages = [[2 * i, 2 * i + 1] for i in range(5)]
    prompts = [rng.integers(0, 256, n).tolist() for n in lens]
    fillers = [rng.integers(0, 256, 30).tolist() for _ in range(4)]    # a 30-token prompt in every step
    results = {}
    for name, runner in (("whole", whole), ("split", split)):
        out = []
        handles = []
        for step in range(4):         # each decode token is the previous step's draw, read on the device
            if step == 0:
                work = [SequenceWork(p, 0, pg, params=params, seed=i) for i, (p, pg) in enumerate(zip(prompts, pages))]
            else:
                work = [SequenceWork([0], n + step - 1, pg, prev_row=i, params=params, seed=i, output_index=step)
                        for i, (n, pg) in enumerate(zip(lens, pages))]
            work.append(SequenceWork(fillers[step], 0, [20 + 2 * step, 21 + 2 * step], params=params, seed=9))
            handles.append(runner.execute(work))
            if len(handles) == 2:
                out.append(handles.pop(0).result())
        out.append(handles.pop().result())
        results[name] = (out, np.asarray(runner.kv_cache[0][0]))
    assert split.calls_run > whole.calls_run == 4
    assert split.rows_run < whole.rows_run and split.tokens_run == whole.tokens_run
    assert split.call_seconds > 0 and whole.call_seconds > 0          # the host's time inside the calls
    for a, b in zip(results["whole"][0], results["split"][0]):
        np.testing.assert_array_equal(a.next_token_ids, b.next_token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
    np.testing.assert_allclose(results["whole"][1], results["split"][1], rtol=1e-5, atol=1e-5)


def test_measured_step_costs_cover_every_bucket_and_write_nothing(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(CFG, token_buckets=(16, 64), page_buckets=(4,), split_steps=True))
    runner.warmup()
    assert set(runner.step_costs) == {16, 64} and all(c > 0 for c in runner.step_costs.values())
    assert all(not np.asarray(k).any() and not np.asarray(v).any() for k, v in runner.kv_cache)
    assert not np.asarray(runner.token_pages).any() and not np.asarray(runner.prev_sampled).any()
    assert runner.tokens_run == runner.rows_run == 0 and runner.call_seconds == 0.0    # warm-up's calls not counted


def test_step_costs_are_timed_round_by_round_after_every_bucket_warmed_up(loaded, monkeypatch):
    """Each round runs every bucket, the first untimed: timed bucket by bucket, the first bucket's steps ran while a
    GPU's clocks were still rising (its cost 1.0-1.4x its real one)."""
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh,
                         dataclasses.replace(CFG, token_buckets=(16, 64), page_buckets=(4,), split_steps=True))
    runner.warmup()
    order, compile_ = [], runner._compile

    def logged(t, p, variant, *rest):
        compiled = compile_(t, p, variant, *rest)

        def run(*args):
            order.append(t)
            return compiled(*args)
        return run
    monkeypatch.setattr(runner, "_compile", logged)
    costs = runner.measure_step_costs(reps=2, rounds=2)
    assert order == [16, 16, 64, 64] * 3
    assert set(costs) == {16, 64} and runner.step_costs == costs
    assert all(0 < c < float("inf") for c in costs.values())


@pytest.mark.parametrize("option,value", [("xla_dot_merger", True), ("attention_in_place", True),
                                          ("triton_gemm_max_tokens", 16), ("separate_sampler", True),
                                          ("attention_programs", 3), ("nested_layers", False),
                                          ("seq_buckets", ((64, 4),))])
def test_steps_with_and_without_an_option_draw_the_same(loaded, option, value, monkeypatch):
    """Options that must not change the numbers: XLA's dot merger (off by default,
    ``RunnerConfig.xla_dot_merger``; an option name XLA did not know would fail the compile), XLA's Triton
    GEMMs off above 16 tokens (``triton_gemm_max_tokens``: the 64-token bucket compiles with
    ``xla_gpu_enable_triton_gemm`` off, an option XLA's CPU compiler takes and ignores), the model and the
    sampler as two executables (``separate_sampler``: the tokens fed back on the device across them) and the
    attention kernels storing into one output (``attention_in_place``, on by default; here both runners'
    attention runs the kernels in interpret mode, as on the GPU, merged by a select or in place), and the
    attention kernels' programs looping over their items (``attention_programs``: 3 programs for the decode
    kernel's 8 slots x 2 kv heads and the prefill kernel's items; both runners in place, in interpret mode), and the
    layers traced one by one instead of as calls of one nested jit (``nested_layers`` False). Prompts, then decode tokens fed
    on the device, seeded sampling with logprobs, give the same tokens, logprobs and KV with the option on."""
    import jaxdyn.models.llama as llama
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    calls = []

    def attention_kernels(*a, in_place, attention_programs=0, **k):
        if in_place and (option == "attention_in_place" or attention_programs):
            calls.append(attention_programs)
        return ragged_paged_attention(*a, **k, in_place=in_place, attention_programs=attention_programs,
                                      impl="interpret")

    if option in ("attention_in_place", "attention_programs"):
        monkeypatch.setattr(llama, "ragged_paged_attention", attention_kernels)
    mesh, model = loaded
    # (one page bucket of 4 pages: the decode kernel takes one context split, so in place is in place)
    cfg = dataclasses.replace(CFG, token_buckets=(16, 64), page_buckets=(4,), split_steps=False,
                              attention_in_place=option == "attention_programs")
    off = ModelRunner(model.graphdef, model.state, mesh, cfg)
    on = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, **{option: value}))
    if option == "triton_gemm_max_tokens":
        assert "xla_gpu_enable_triton_gemm" in on.compiler_options(64)
        assert "xla_gpu_enable_triton_gemm" not in on.compiler_options(16)
        assert "xla_gpu_enable_triton_gemm" not in off.compiler_options(2048)
    off.warmup()
    on.warmup()
    compiled_keys = []
    if option == "seq_buckets":      # the steps' executables as execute asks for them
        compile_on = on._compile
        on._compile = lambda *a: compiled_keys.append(a) or compile_on(*a)
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=0.8, top_p=0.9, logprobs=2, seed=3)
    lens = [int(n) for n in rng.integers(3, 10, 4)]
    prompts = [rng.integers(0, 256, n).tolist() for n in lens]
    pages = [[2 * i, 2 * i + 1] for i in range(4)]
    results = {}
    for name, runner in (("off", off), ("on", on)):
        out, handles = [], []
        for step in range(5):
            if step == 0:
                work = [SequenceWork(p, 0, pg, params=params, seed=i) for i, (p, pg) in enumerate(zip(prompts, pages))]
            else:
                work = [SequenceWork([0], n + step - 1, pg, prev_row=i, params=params, seed=i, output_index=step)
                        for i, (n, pg) in enumerate(zip(lens, pages))]
            handles.append(runner.execute(work))
            if len(handles) == 2:
                out.append(handles.pop(0).result())
        out.append(handles.pop().result())
        results[name] = (out, np.asarray(runner.kv_cache[0][0]))
    assert np.asarray(results["off"][1]).any()      # the prompts' K was written
    for a, b in zip(results["off"][0], results["on"][0]):
        np.testing.assert_array_equal(a.next_token_ids, b.next_token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
    np.testing.assert_allclose(results["off"][1], results["on"][1], rtol=1e-6, atol=1e-6)
    if option == "seq_buckets":      # the prompts' step (4 rows, 26 tokens) ran the 64-token bucket's 4 slots
        assert compiled_keys[0][0] == 64 and compiled_keys[0][3] == 4
        assert all(len(k) == 3 or k[3] is None for k in compiled_keys[1:])      # the decode steps: 16's own
    # the in-place attention ran (with the programs asked for), and only with its option on
    assert (len(calls) > 0) == (option in ("attention_in_place", "attention_programs"))
    assert all(c == (value if option == "attention_programs" else 0) for c in calls)


def test_seq_buckets_are_checked_and_split_steps_take_them_part_by_part(loaded):
    """``seq_buckets``: each pair a token bucket with fewer slots than its own; with ``separate_sampler`` the
    forward and the sampler of the fewer slots are parts of their own (their cache names distinct), and a step
    whose rows fit them draws what the bucket's own slots draw."""
    from jaxdyn.engine.runner import _cache_name
    for bad, match in ((((64, 8),), "fewer sequence slots"), (((32, 4),), "token bucket"), (((64, 0),), ">= 1"),
                       (((64, "4"),), ">= 1"), ((64, 4), "pairs"), (5, "pairs")):
        with pytest.raises(ValueError, match="seq_buckets"):
            RunnerConfig(**dict(dataclasses.asdict(CFG), token_buckets=(16, 64), seq_buckets=bad))
    mesh, model = loaded
    cfg = dataclasses.replace(CFG, token_buckets=(16, 64), page_buckets=(4,), split_steps=False,
                              separate_sampler=True, sampler_switch=False)
    own = ModelRunner(model.graphdef, model.state, mesh, cfg)
    fewer = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(cfg, seq_buckets=((64, 4), (64, 2))))
    assert fewer.config.seq_options(64) == (2, 4, 8) and fewer.config.seq_options(16) == (8,)
    from jaxdyn.engine.llm import describe_compile
    line = describe_compile(dict(slowest=("sample", 64, 4, "greedy", 2), parts=1, threads=1, wall_s=1.0,
                                 compile_s=1.0, compile_max_s=1.0, lower_s=0.1, by_tokens={64: 1.0}))
    assert "sample 64 tokens x 4 pages greedy x 2 slots" in line
    keys = fewer.part_keys()
    assert ("forward", 64, 4, 4) in keys and ("sample", 64, 4, VARIANTS[0], 2) in keys
    assert len({_cache_name(k) for k in keys}) == len(keys) == len(own.part_keys()) * 2
    own.warmup()
    fewer.warmup()
    rng = np.random.default_rng(9)
    for rows in (2, 3, 5):       # 2 slots, 4, the bucket's own 8
        prompts = [rng.integers(0, 256, 40 // rows).tolist() for _ in range(rows)]
        work = [SequenceWork(p, 0, [2 * i, 2 * i + 1], seed=i) for i, p in enumerate(prompts)]
        a, b = own.step(work), fewer.step(work)
        np.testing.assert_array_equal(a.next_token_ids, b.next_token_ids)
        t, p, _, arrays, _, s = fewer._pack(work)
        assert (t, s) == (64, {2: 2, 3: 4, 5: None}[rows]) and arrays[2].shape[0] == (s or 8)


# ---- compiling while the weights load ---------------------------------------------------------------


def _abstract(model):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.state)


def test_steps_compile_while_the_weights_load_and_step_as_a_runner_built_on_them(loaded, variant_runner):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, _abstract(model), mesh, VARIANT_CFG)
    assert not runner.weights_loaded
    with pytest.raises(RuntimeError, match="no weights yet"):
        runner.execute([SequenceWork([1, 2], 0, [0])])
    with pytest.raises(RuntimeError, match="no weights yet"):
        runner.warmup()
    seen = []

    def load():
        # the weights arrive only once a step has compiled without them: a load that ran first,
        # or a compilation that waited for the load, fails here
        deadline = time.monotonic() + 300
        while not runner._compiled and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(len(runner._compiled))
        return model

    before = compilation_count()
    assert runner.load_weights(load) is model and runner.weights_loaded
    assert seen[0] >= 1
    assert set(runner._compiled) == set(variant_runner[0]._compiled)
    runner.warmup()
    # nothing twice; + the page copy, + the pages' zeros (allocated once the steps are compiled)
    assert compilation_count() - before == 2 * len(VARIANTS) + 2
    work = [SequenceWork(token_ids=[5, 6, 7], num_computed=0, page_ids=[0]),
            SequenceWork(token_ids=list(range(20, 40)), num_computed=0, page_ids=[1, 2])]
    np.testing.assert_array_equal(runner.step(work).next_token_ids, variant_runner[0].step(work).next_token_ids)


def test_a_runner_built_on_shapes_allocates_its_pages_once_its_steps_are_compiled(loaded, monkeypatch):
    # loading's and compiling's transient buffers are gone before the pages take their room
    import jaxdyn.engine.runner as runner_mod
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, _abstract(model), mesh, VARIANT_CFG)
    assert not runner.kv_allocated
    assert all(isinstance(k, jax.ShapeDtypeStruct) and k.sharding is not None for k, _ in runner.kv_cache)
    at_allocation, watched = [], [runner]
    real = runner_mod.allocate_kv_cache

    def allocate(spec, mesh_):
        compiling = [t for t in threading.enumerate() if t.name == "jaxdyn-compile-while-loading"]
        at_allocation.append((len(watched[0]._parts), bool(compiling), watched[0].weights_loaded))
        return real(spec, mesh_)

    monkeypatch.setattr(runner_mod, "allocate_kv_cache", allocate)
    during_load = []

    def load():
        during_load.append(runner.kv_allocated)
        return model

    runner.load_weights(load)
    users = runner._part_users()
    assert during_load == [False] and at_allocation == [(len(users), False, True)]
    assert runner.kv_allocated and runner.kv_cache[0][0].shape == runner.kv_spec.page_shape
    runner.warmup()
    assert at_allocation == [(len(users), False, True)]            # once
    # without compiling while loading, the weights bring the pages
    other = watched[0] = ModelRunner(model.graphdef, _abstract(model), mesh, VARIANT_CFG)
    other.load_weights(lambda: model, compile_steps=False)
    assert other.kv_allocated and at_allocation[1:] == [(0, False, True)]


def test_a_step_that_would_not_fit_beside_the_pages_is_refused_with_the_sizes(loaded, monkeypatch):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, CFG)
    runner._compile_steps()
    need = runner.step_memory_need()
    # XLA's CPU buffer assignment reports each executable's temporaries: the largest step's are the need
    assert need is not None and need > 0
    runner.check_step_room()                                 # the CPU keeps no limit: nothing to check
    gib = 2 ** 30
    monkeypatch.setattr(runner, "_memory_stats",
                        lambda: {"bytes_limit": 10 * gib, "bytes_in_use": 10 * gib - need + 1})
    with pytest.raises(ValueError, match=r"96 pages leave 0\.\d\d GiB of the device's 10\.00 GiB limit, and the "
                                         r"largest compiled step allocates .* use fewer pages"):
        runner.check_step_room()
    with pytest.raises(ValueError, match="use fewer pages"):
        runner.warmup()
    monkeypatch.setattr(runner, "_memory_stats", lambda: {"bytes_limit": 10 * gib, "bytes_in_use": 10 * gib - need})
    runner.check_step_room()
    runner.warmup()
    # the need leaves out the donated pages the steps return (aliased): the pool is no part of it
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in runner.kv_cache)
    temps = [c.memory_analysis().temp_size_in_bytes for c in runner._parts.values()]
    assert max(temps) <= need < max(temps) + kv_bytes


def test_pages_allocated_after_compiling_are_checked_against_the_steps_need(loaded, monkeypatch):
    # a device whose memory the pages fill: load_weights refuses once it has allocated them, naming the sizes
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, _abstract(model), mesh, CFG)
    gib = 2 ** 30
    monkeypatch.setattr(runner, "_memory_stats",
                        lambda: {"bytes_limit": 10 * gib, "bytes_in_use": 10 * gib if runner.kv_allocated else 0})
    with pytest.raises(ValueError, match=r"96 pages leave 0\.00 GiB .* largest compiled step allocates"):
        runner.load_weights(lambda: model)
    assert runner.kv_allocated


def test_a_split_step_holds_its_forwards_logits_while_its_sampler_runs(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(CFG, separate_sampler=True))
    runner._compile_steps()

    def part(key):
        m = runner._parts[key].memory_analysis()
        return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes, \
            m.output_size_in_bytes - m.alias_size_in_bytes

    want = 0
    for step in runner._compiled:
        keys = runner._part_keys(*step)
        if len(keys) == 2:
            (fwd_need, fwd_out), (sample_need, _) = part(keys[0]), part(keys[1])
            assert fwd_out > 0                              # the logits
            want = max(want, fwd_need, fwd_out + sample_need)
        else:
            want = max(want, part(keys[0])[0])
    assert runner.step_memory_need() == want


def test_a_failed_load_stops_the_compiling_after_the_step_in_hand_and_raises(loaded):
    mesh, model = loaded
    cfg = dataclasses.replace(VARIANT_CFG, token_buckets=(16, 32, 64))
    runner = ModelRunner(model.graphdef, _abstract(model), mesh, cfg)

    def load():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        runner.load_weights(load)
    # the compiling thread has ended (a process exiting while XLA compiles on it aborts)
    assert not [t for t in threading.enumerate() if t.name == "jaxdyn-compile-while-loading"]
    # it stopped after the step it was compiling: not all of the 3 buckets' variants
    assert len(runner._compiled) < 3 * len(VARIANTS)
    assert not runner.weights_loaded


def test_weights_unlike_the_abstract_state_are_refused_by_name(loaded):
    mesh, model = loaded
    runner = ModelRunner(model.graphdef, _abstract(model), mesh, VARIANT_CFG)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model.state)
    for i, change in ((0, lambda x: x.astype(jnp.bfloat16)), (3, lambda x: x[:1]), (5, np.asarray)):
        bad = [change(x) if j == i else x for j, (_, x) in enumerate(leaves)]
        with pytest.raises(ValueError, match=re.escape(jax.tree_util.keystr(leaves[i][0]))):
            runner.set_weights(jax.tree.unflatten(treedef, bad))
    with pytest.raises(ValueError, match="another structure"):
        runner.set_weights({"w": model.state})
    assert not runner.weights_loaded and not runner.kv_allocated
    runner.set_weights(model.state)
    assert runner.weights_loaded and runner.kv_allocated


@pytest.mark.parametrize("quant,head,options", [
    (None, False, {}),
    ("fp8", True, dict(fp8_fused_quantize="all", fp8_fused_quantize_min_tokens=0, attention_programs=264,
                       kv_cache_dtype="fp8", skip_idle_prefill=True, fp8_fused_norm=True)),
    ("fp8", False, dict(fp8_kernel_max_tokens=16, separate_sampler=True)),
    ("fp8", False, dict(kv_cache_dtype="fp8", skip_idle_prefill=True, sampler_switch=True)),
    ("fp8", False, dict(kv_cache_dtype="fp8", sampler_switch="plain_full")),
    (None, False, dict(kv_cache_dtype="fp8", attention_fp8_products="qk_pv")),
    ("fp8", False, dict(kv_cache_dtype="fp8", fp8_fused_quantize="all", fp8_fused_norm=True, fused_rope_kv=True,
                        family="llama3.1")),
])
def test_every_step_lowers_for_a_gpu_with_the_kernels_on(tmp_path, monkeypatch, quant, head, options):
    """Each bucket's step in every sampler variant, lowered for a GPU on the CPU with the Pallas kernels as a GPU
    runs them (``on_gpu`` patched true; Pallas' Triton lowering runs here, Triton's GPU passes do not): the
    attention kernels, an fp8 model's quantization and few-row product kernels, fp8 pages, persistent programs,
    an fp8 lm_head (``head``), the prefill kernel under a condition (``skip_idle_prefill``), the fused norms
    (``fp8_fused_norm``), the rotation and K/V write in one kernel (``fused_rope_kv``; a family without q/k norms).
    A construct only the GPU path takes fails here rather than on the device."""
    import importlib
    import json
    import os

    from jaxdyn.config import ModelConfig
    # (by module name: the package exports a function named like the attention module)
    modules = [importlib.import_module(f"pallas_kernels.{m}")
               for m in ("paged_decode", "ragged_paged_attention", "fp8_quantize", "fp8_matmul", "sampling_thresholds",
                         "rms_norm_fp8", "rope_kv")]
    options = dict(options)
    path = make_hf_checkpoint(options.pop("family", "qwen3"), str(tmp_path))
    with open(os.path.join(path, "config.json")) as f:
        cfg = dataclasses.replace(ModelConfig.from_dict(json.load(f)), quantization=quant, quantize_lm_head=head)
    mesh = make_mesh(1)
    model = load_hf_checkpoint(path, mesh, dtype=jnp.bfloat16, config=cfg)
    for module in modules:
        monkeypatch.setattr(module, "on_gpu", lambda: True)
    runner = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(
        CFG, max_num_seqs=32, token_buckets=(16, 64), page_buckets=(8,), **options))
    # each bucket's steps whole (separate_sampler's split too), a switched variant's through its switch
    own = [v for v in VARIANTS if v not in runner._switch] + (["switch"] if runner._switch else [])
    for (t, _, p), variant in itertools.product(runner.bucket_shapes(), own):
        switch = variant == "switch"
        step = runner._switched if switch else runner._jitted[variant]
        lowered = step.trace(runner.state, runner.kv_cache, runner.token_pages, runner.prev_sampled,
                             *runner._input_shapes(t, p))
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        # no buffer filled with a constant: XLA makes it a memset, which ends a CUDA graph, and inside a
        # conditional's branch (the skip's, the switch's) keeps the conditional out of the graph: a host sync
        assert constant_filled_buffers(lowered.jaxpr) == [], (t, variant)
        assert "stablehlo.while" not in text, (t, variant)     # a loop outside the graph: a host sync an iteration
        if switch:      # one more conditional (the sampler's), no sort (a CUB call on a GPU), the thresholds' kernel
            layers = cfg.num_layers if options.get("skip_idle_prefill") else 0
            assert lowered_count(text, "stablehlo.case") == layers + 1 and "stablehlo.sort" not in text
            assert "sampling_thresholds" in text
        # the decode and prefill kernels, and the fp8 quantization kernel (every step with the fused
        # quantization from 0 tokens) or the few-row product kernel (steps of at most 16 tokens)
        fp8_kernel = (options.get("fp8_fused_quantize") == "all"
                      or t <= options.get("fp8_kernel_max_tokens", 0))
        assert lowered_count(text, "__gpu$xla.gpu.triton") >= (3 if fp8_kernel else 2), (t, variant)
        # the residual adds, norms and their quantization as one kernel a site (``fp8_fused_norm``)
        assert ("add_rms_norm_fp8" in text) == bool(options.get("fp8_fused_norm")), (t, variant)
        assert ("rope_write_kv" in text) == bool(options.get("fused_rope_kv")), (t, variant)
        # the head: an fp8 [vocab, hidden] operand of the step (the float head's [hidden, vocab] otherwise)
        fp8_head = f"tensor<{cfg.vocab_size}x{cfg.hidden_size}xf8E4M3FN>"
        assert (fp8_head in text) == head, (t, variant)
        # skip_idle_prefill: each layer's prefill kernel inside a conditional
        cases = lowered_count(text, "stablehlo.case")
        assert (cases >= cfg.num_layers) if options.get("skip_idle_prefill") else (cases < cfg.num_layers), \
            (t, variant, cases)


def test_attention_fp8_products_reach_the_decode_kernel(tmp_path, monkeypatch):
    """``attention_fp8_products`` is handed to the decode kernel: lowered for a GPU, a step's decode kernel is
    another Triton program with it ("qk", "qk_pv") than without, and the prefill kernel the same; with 16-bit pages
    the option is refused (it has nothing to act on)."""
    import importlib
    import re

    modules = [importlib.import_module(f"pallas_kernels.{m}") for m in ("paged_decode", "ragged_paged_attention")]
    path = make_hf_checkpoint("qwen3", str(tmp_path))
    mesh = make_mesh(1)
    model = load_hf_checkpoint(path, mesh, dtype=jnp.bfloat16)
    for module in modules:
        monkeypatch.setattr(module, "on_gpu", lambda: True)

    def kernels(products):
        """{bucket: {attention Triton call's name: its serialized programs}} of one runner's steps"""
        runner = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(
            CFG, max_num_seqs=32, token_buckets=(16, 64), page_buckets=(32,), kv_cache_dtype="fp8",
            attention_fp8_products=products))
        by_bucket = {}
        for t, _, p in runner.bucket_shapes():
            text = runner._jitted[VARIANTS[0]].trace(runner.state, runner.kv_cache, runner.token_pages,
                                                     runner.prev_sampled, *runner._input_shapes(t, p)
                                                     ).lower(lowering_platforms=("cuda",)).as_text()
            # each attention Triton call's name and serialized program (a line of the text each)
            calls = by_bucket[t] = {}
            for line in text.splitlines():
                if "__gpu$xla.gpu.triton" in line and (m := re.search(r'name = "([a-z_]+)"', line)):
                    calls.setdefault(m.group(1), set()).add(re.search(r'ir = "(.*?)", name = ', line).group(1))
            assert "paged_decode_attention" in calls and "ragged_prefill_attention" in calls, set(calls)
        return by_bucket

    lowered = {p: kernels(p) for p in ("off", "qk", "qk_pv")}
    # 16 slots: the decode kernel splits contexts (a call of few slots); 32: one split, in place
    for bucket in (16, 64):
        off, qk, qk_pv = (lowered[p][bucket] for p in ("off", "qk", "qk_pv"))
        decode = [frozenset(c["paged_decode_attention"]) for c in (off, qk, qk_pv)]
        assert len(set(decode)) == 3, f"each setting its own decode program ({bucket}-token step)"
        assert off["ragged_prefill_attention"] == qk["ragged_prefill_attention"] == qk_pv["ragged_prefill_attention"]
    with pytest.raises(ValueError, match="attention_fp8_products"):
        dataclasses.replace(CFG, attention_fp8_products="kv")
    with pytest.raises(ValueError, match="needs kv_cache_dtype 'fp8'"):
        dataclasses.replace(CFG, attention_fp8_products="qk")
    from jaxdyn import EngineConfig
    with pytest.raises(ValueError, match="needs kv_cache_dtype 'fp8'"):
        EngineConfig(attention_fp8_products="qk")


def test_nested_layers_trace_one_layer_a_step_and_lower_the_unrolled_program(loaded, monkeypatch):
    """``nested_layers`` (the default): a step traces one decoder layer, not each of them, and inlines its jaxpr
    for every layer, so the lowered program is the one the layers traced one by one make (the same text but for
    its source locations); off, each layer is traced. Traced afresh for each new runner (a patched layer is
    seen)."""
    import re

    import jaxdyn.models.llama as llama
    mesh, model = loaded
    traced = []
    real = llama.DecoderLayer.__call__

    def counting(self, *a, **k):
        traced.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(llama.DecoderLayer, "__call__", counting)
    layers = len(model.state["layers"])
    assert layers >= 2
    texts = {}
    for nested in (True, False):
        runner = ModelRunner(model.graphdef, model.state, mesh,
                             dataclasses.replace(CFG, token_buckets=(16,), page_buckets=(4,), nested_layers=nested))
        traced.clear()
        step = runner._jitted[GREEDY].trace(runner.state, runner.kv_cache, runner.token_pages, runner.prev_sampled,
                                            *runner._input_shapes(16, 4))
        assert len(traced) == (1 if nested else layers), nested
        texts[nested] = step.lower().as_text()
    ops = set(re.findall(r"stablehlo\.\w+", texts[False]))
    assert {"stablehlo.dot_general", "stablehlo.rsqrt", "stablehlo.scatter"} <= ops
    # every op as often (through the calls of private functions: their names and sharing may differ)
    assert {op: lowered_count(texts[True], op) for op in ops} == {op: lowered_count(texts[False], op) for op in ops}
    assert lowered_count(texts[True], "stablehlo.dot_general") >= 4 * layers
    with pytest.raises(ValueError, match="nested_layers: expected true or false"):
        RunnerConfig(nested_layers=1)


@pytest.mark.gpu
def test_on_a_gpu_the_default_switches_plain_and_full_and_draws_what_four_executables_draw(tmp_path):
    """On a GPU the default runner (``sampler_switch`` None) compiles greedy's and random's steps and one switch
    over plain and full a bucket, and every kind of row, alone and mixed, draws the tokens and logprobs that the
    four executables a bucket (``sampler_switch=False``) draw (the switch's full branch takes its top logprobs by
    masked argmaxes, the variant's own by ``lax.top_k``: the same ids, ties included)."""
    path = make_hf_checkpoint("qwen3", str(tmp_path))
    mesh = make_mesh(1)
    model = load_hf_checkpoint(path, mesh, dtype=jnp.bfloat16)
    default = ModelRunner(model.graphdef, model.state, mesh, VARIANT_CFG)
    four = ModelRunner(model.graphdef, model.state, mesh, dataclasses.replace(VARIANT_CFG, sampler_switch=False))
    default.warmup()
    four.warmup()
    assert sorted({k[0] for k in default._parts}) == ["step", "switch"]
    assert {k[3] for k in default._parts if k[0] == "step"} == {GREEDY, RANDOM}
    _assert_same_draws(default, four, (("top-k",), ("top-p-min-p",), ("penalties",), ("logprobs",),
                                       ("greedy", "seeded-banned", "top-p-min-p", "penalties", "logprobs",
                                        "greedy-logprobs", "banned")))
