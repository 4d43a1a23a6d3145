"""Disaggregated prefill and decode in one process, on 8 virtual CPU devices: the same greedy
float32 tokens as aggregated serving (TP 2 -> TP 2 and TP 2 -> TP 4), prefix cache and chunked
prefill on both sides, the policy's decisions, aborts, timeouts and a dead prefill role, and
every page back in both pools."""

import asyncio
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineConfig, EngineCore, SamplingParams
from jaxdyn.disagg.policy import DisaggPolicy
from jaxdyn.engine.async_engine import RequestFailedError
from jaxdyn.engine.llm import build_disagg_engine
from jaxdyn.kv.transfer import KVGather, KVScatter, measure_handoff, page_buckets
from jaxdyn.parallel.sharding import make_mesh
from tests.support import make_byte_tokenizer, make_hf_checkpoint

CFG = EngineConfig(num_pages=48, page_size=16, max_num_batched_tokens=32, max_num_seqs=8,
                   max_model_len=192, token_buckets=(8, 32), page_buckets=(4, 12),
                   fail_on_compile=True, seed=0)
POLICY = DisaggPolicy(min_remote_tokens=24, max_prefill_queue=64, prefill_timeout_s=600)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("qwen3")))
    make_byte_tokenizer(path)
    return path


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 250, 70).tolist()
    prompts = {
        "short": rng.integers(3, 250, 9).tolist(),                   # local: short prompt
        "long": rng.integers(3, 250, 130).tolist(),                  # remote, chunked (budget 32)
        "mid": rng.integers(3, 250, 47).tolist(),                    # remote, length not a page multiple
        "page": rng.integers(3, 250, 64).tolist(),                   # remote, exactly 4 pages
        "shared-a": shared + rng.integers(3, 250, 11).tolist(),      # remote
        "shared-b": shared + rng.integers(3, 250, 30).tolist(),      # remote, prefix hit on the prefill side
    }
    return prompts


def _run(engine, reqs, after=None):
    """reqs: list of (id, prompt, params) submitted in order; returns {id: final output}."""
    results = {}
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    return results


@pytest.fixture(scope="module")
def aggregated(ckpt):
    """What aggregated serving (TP 2, its own devices) answers; a fresh prefix cache per call."""
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32, mesh=make_mesh(2, jax.devices()[6:8]))
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()

    def run(reqs):
        core.prefix_cache.clear()
        return _run(core, reqs)
    return run


def _check_clean(engine):
    for core in (engine.prefill, engine.decode):
        deadline = time.monotonic() + 30
        while core is engine.prefill and core.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)        # the prefill thread finishes what was aborted on its own
        core.scheduler.check_invariants()
        assert not core.scheduler.held and not core.scheduler.reserved
        assert core.allocator.num_in_use == 0, "pages leaked"
        if core.prefix_cache is not None:
            core.prefix_cache.clear()
        assert core.allocator.num_free == core.num_pages, "pages leaked"
    assert engine.metrics.compilations_after_warmup == 0


@pytest.fixture(scope="module", params=[(2, 2), (2, 4)], ids=["tp2-tp2", "tp2-tp4"])
def disagg(ckpt, request):
    ptp, dtp = request.param
    eng = build_disagg_engine(ckpt, prefill_devices=range(ptp), decode_devices=range(ptp, ptp + dtp),
                              dtype=jnp.float32, config=CFG, policy=POLICY)
    yield eng
    eng.shutdown()


def test_greedy_tokens_equal_aggregated_serving(disagg, aggregated):
    prompts = _prompts()
    reqs = [(rid, p, GREEDY) for rid, p in prompts.items() if rid != "shared-b"]
    # then: "shared-b" hits the prefill side's cache (shared-a's pages); a repeat of "long" stays
    # local (the decode side's cache holds its pages) and reuses them
    reqs_then = [("shared-b", prompts["shared-b"], GREEDY), ("long-again", prompts["long"] + [5, 6], GREEDY)]
    want = aggregated(reqs)
    want.update(aggregated(reqs_then))
    before = dict(disagg.metrics.prefill_decisions)
    got = _run(disagg, reqs)
    got.update(_run(disagg, reqs_then))
    for rid in want:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids, rid
        assert got[rid].outputs[0].finish_reason == "length"
        assert got[rid].error is None
    made = {k: v - before.get(k, 0) for k, v in disagg.metrics.prefill_decisions.items()}
    assert made.get("remote") == 5 and made.get("short_prompt") == 1 and made.get("prefix_hit") == 1, made
    # chunked prefill and the prefix cache on the prefill side; the decode side's hit
    assert disagg.prefill.metrics.prefix_cache_hits >= 64
    assert disagg.decode.metrics.prefix_cache_hits >= 128
    assert got["long-again"].num_cached_tokens == 128
    assert disagg.metrics.kv_transfers >= 5
    # bytes of the real kv heads (2), not of the TP replicas
    ps, layers, hd = 16, 2, 32
    pages = sum(-(-len(p) // ps) for rid, p in prompts.items() if rid != "short")
    assert disagg.metrics.kv_transfer_bytes >= pages * 2 * layers * 2 * ps * hd * 4
    _check_clean(disagg)


def test_a_request_scoring_its_prompt_is_computed_on_the_decode_side(disagg, aggregated):
    """``prompt_logprobs``: a prompt long enough to go remote stays local (a hand-over carries KV only), counted
    ``prompt_logprobs``, and scores its prompt as aggregated serving does (TP on both)."""
    prompt = _prompts()["long"]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    want = aggregated([("pl", prompt, params)])["pl"]
    before = dict(disagg.metrics.prefill_decisions)
    got = _run(disagg, [("pl", prompt, params)])["pl"]
    made = {k: v - before.get(k, 0) for k, v in disagg.metrics.prefill_decisions.items() if v != before.get(k, 0)}
    assert made == {"prompt_logprobs": 1}, made
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(prompt) and got.prompt_logprobs[0] is None
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert sorted(a) == sorted(b) and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    _check_clean(disagg)


def test_sampled_stop_strings_and_logprobs_cross_the_handoff(disagg, aggregated):
    """The first token is drawn on the prefill side with the request's seed and goes through the
    decode side's stop checks; logprobs of every token, the first included, come back."""
    prompts = _prompts(1)
    tok = disagg.tokenizer
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, logprobs=2)
    reqs = [("s-long", prompts["long"], sampled), ("s-mid", prompts["mid"], sampled)]
    got = _run(disagg, reqs)
    want = aggregated(reqs)
    for rid in want:
        g, w = got[rid].outputs[0], want[rid].outputs[0]
        assert g.token_ids == w.token_ids
        assert len(g.logprobs) == len(g.token_ids) == 10
        np.testing.assert_allclose([d[t].logprob for d, t in zip(g.logprobs, g.token_ids)],
                                   [d[t].logprob for d, t in zip(w.logprobs, w.token_ids)], atol=1e-4)
    # a stop string found in the very first token ends the request at once
    first = got["s-long"].outputs[0].token_ids[0]
    stop_text = tok.decode([first])
    assert stop_text.strip() and "\ufffd" not in stop_text, stop_text      # (the seed draws a whole character)
    p = dataclasses.replace(sampled, stop=[stop_text], max_tokens=10)
    out = _run(disagg, [("s-stop", prompts["long"], p)])["s-stop"].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == [first]
    _check_clean(disagg)


def test_abort_during_remote_prefill_frees_both_sides(disagg):
    prompts = _prompts(2)
    disagg.add_request("a1", prompts["long"], GREEDY)
    disagg.add_request("a2", prompts["page"], GREEDY)
    assert disagg.decode.scheduler.reserved          # pages wait on the decode side
    out = disagg.abort("a1")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert "a1" not in disagg.decode.scheduler.reserved
    results = _run(disagg, [])
    assert set(results) == {"a2"} and len(results["a2"].outputs[0].token_ids) == 12
    _check_clean(disagg)


def test_timed_out_remote_prefill_ends_with_an_error(disagg):
    prompts = _prompts(3)
    old = disagg.policy
    disagg.policy = dataclasses.replace(old, prefill_timeout_s=1e-6)
    failures = disagg.metrics.remote_prefill_failures
    try:
        results = _run(disagg, [("t1", prompts["long"], GREEDY)])
    finally:
        disagg.policy = old
    assert results["t1"].error and "did not finish" in results["t1"].error
    assert disagg.metrics.remote_prefill_failures == failures + 1
    _check_clean(disagg)


def test_min_tokens_cross_the_handoff(disagg, aggregated):
    """A remote request with min_tokens > 1: the prefill draws its one token with the end tokens banned, as the
    whole request's first token is (before, its params failed to build after the pages were reserved)."""
    prompts = _prompts(6)
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3)
    reqs = [("m1", prompts["long"], params), ("m2", prompts["mid"], dataclasses.replace(params, min_tokens=8))]
    got, want = _run(disagg, reqs), aggregated(reqs)
    for rid in ("m1", "m2"):
        assert got[rid].error is None, got[rid].error
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids
    assert len(got["m2"].outputs[0].token_ids) == 8
    _check_clean(disagg)


def test_a_handoff_that_does_not_fit_fails_its_request_only(disagg):
    """A KV block of another page size (a prefill worker configured otherwise): that request ends with an error
    naming the shapes, its reserved pages freed, and the engine goes on."""
    from jaxdyn.disagg.engine import Handoff
    prompts = _prompts(7)
    disagg.add_request("h1", prompts["long"], GREEDY)
    pages = len(disagg._remote["h1"].pages)
    good = disagg.scatter.block_shape(min(b for b in disagg.scatter.buckets if b >= pages))
    bad = np.zeros(good[:4] + (good[4] // 2, good[5]), np.float32)       # pages of half the size
    assert disagg.scatter.refusal(list(range(pages)), np.zeros(good, np.float32), prompts["long"]) is None
    assert disagg.scatter.refusal(list(range(pages)), bad, prompts["long"]) is not None
    out = disagg.accept_handoff(Handoff("h1", bad, 5, None, 0, time.monotonic()))
    assert out.finished and "does not fit this engine" in out.error and "shape" in out.error
    assert "h1" not in disagg.decode.scheduler.reserved
    got = _run(disagg, [("h2", prompts["page"], GREEDY)])       # the real handoff of h1 is dropped on arrival
    assert got["h2"].error is None and len(got["h2"].outputs[0].token_ids) == 12
    _check_clean(disagg)


def test_a_handoff_the_decode_engine_refuses_fails_its_request_only(disagg, monkeypatch):
    """A RequestError out of the decode engine's add_prefilled (any of its refusals) escaped DisaggEngine.step and
    killed the engine: that request ends with the error, its reserved pages freed, and the rest go on."""
    from jaxdyn.disagg.engine import Handoff
    from jaxdyn.engine.core import RequestError
    prompts = _prompts(8)
    disagg.add_request("r1", prompts["long"], GREEDY)
    pages = len(disagg._remote["r1"].pages)
    block = np.zeros(disagg.scatter.block_shape(min(b for b in disagg.scatter.buckets if b >= pages)), np.float32)
    real = disagg.decode.add_prefilled

    def refuse(request_id, *a, **k):
        disagg.decode.scheduler.unreserve(request_id)         # as add_prefilled's own refusals do
        raise RequestError("prompt", "refused for the test")
    monkeypatch.setattr(disagg.decode, "add_prefilled", refuse)
    out = disagg.accept_handoff(Handoff("r1", block, 5, None, 0, time.monotonic()))
    assert out.finished and "refused for the test" in out.error
    assert "r1" not in disagg.decode.scheduler.reserved and "r1" not in disagg._remote
    monkeypatch.setattr(disagg.decode, "add_prefilled", real)
    got = _run(disagg, [("r2", prompts["page"], GREEDY)])       # the real handoff of r1 is dropped on arrival
    assert got["r2"].error is None and len(got["r2"].outputs[0].token_ids) == 12
    _check_clean(disagg)


def test_a_prompt_no_prefill_worker_took_is_computed_here(disagg, aggregated):
    """The prefill role's ("local", id, why): no worker could be reached before it answered, so the decode
    engine computes the prompt (the same tokens), and the decision is counted as prefill_unreachable; no count
    goes down meanwhile (remote is counted once a remote prefill is over, not taken back: Prometheus would read a
    counter that falls as a reset)."""
    prompts = _prompts(8)
    before = dict(disagg.metrics.prefill_decisions)
    disagg.add_request("l1", prompts["long"], GREEDY)
    assert disagg.metrics.prefill_decisions.get("remote", 0) == before.get("remote", 0)    # not yet over
    disagg._handoffs.put(("local", "l1", "no prefill worker reachable (test)"))
    got = _run(disagg, [])
    want = aggregated([("l1", prompts["long"], GREEDY)])
    assert got["l1"].error is None and got["l1"].outputs[0].token_ids == want["l1"].outputs[0].token_ids
    made = {k: v - before.get(k, 0) for k, v in disagg.metrics.prefill_decisions.items()}
    assert made.get("prefill_unreachable") == 1 and made.get("remote", 0) == 0
    # a prompt the decode engine cannot take after all ends with an error, its reserved pages freed
    from jaxdyn.engine.core import RequestError

    def refuse(prompt_ids, params):
        raise RequestError("prompt", "refused for the test")
    disagg.add_request("l2", prompts["mid"], GREEDY)
    check, disagg.decode.check_request = disagg.decode.check_request, refuse
    try:
        disagg._handoffs.put(("local", "l2", "no prefill worker reachable (test)"))
        got = _run(disagg, [])
    finally:
        disagg.decode.check_request = check
    assert "cannot take it" in got["l2"].error and "refused for the test" in got["l2"].error
    assert "l2" not in disagg.decode.scheduler.reserved
    _check_clean(disagg)


def test_async_stream_over_disagg_first_token_then_rest(disagg, monkeypatch):
    """The engine sends the prefill's first token alone, then the decode's; the stream may merge what a slow
    reader left queued (``AsyncEngine.stream``), so the first-token check reads the engine's own outputs."""
    prompts = _prompts(4)
    sent = []
    step = disagg.step

    def recording_step():
        outs = step()
        sent.extend(o for o in outs if o.request_id == "as1")
        return outs

    monkeypatch.setattr(disagg, "step", recording_step)

    async def main():
        eng = AsyncEngine(disagg)
        try:
            outs = [o async for o in eng.generate(prompts["long"], GREEDY, "as1")]
        finally:
            eng._stop = True
            eng._thread.join(timeout=10)
        return outs

    outs = asyncio.run(main())
    assert len(sent[0].outputs[0].token_ids) == 1 and not sent[0].finished    # first token alone
    assert len(sent) > 1                                                      # the rest after it
    assert outs[0].outputs[0].token_ids
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
    assert outs[-1].outputs[0].token_ids == sent[-1].outputs[0].token_ids
    _check_clean(disagg)


def test_dead_prefill_role_fails_its_requests_and_the_rest_go_local(ckpt):
    eng = build_disagg_engine(ckpt, prefill_devices=[0, 1], decode_devices=[2, 3], dtype=jnp.float32,
                              config=CFG, policy=POLICY, warmup=False)
    try:
        def boom():
            raise RuntimeError("injected prefill failure")
        eng.prefill.step = boom
        prompts = _prompts(5)
        got = _run(eng, [("d1", prompts["long"], GREEDY)])
        assert "prefill engine died" in got["d1"].error
        assert eng.prefill_dead is not None
        got = _run(eng, [("d2", prompts["long"], GREEDY)])
        assert got["d2"].error is None and len(got["d2"].outputs[0].token_ids) == 12
        assert eng.metrics.prefill_decisions.get("prefill_down") == 1
        for core in (eng.decode,):
            core.scheduler.check_invariants()
            assert not core.scheduler.reserved and core.allocator.num_in_use == 0
    finally:
        eng.shutdown()


def test_async_engine_turns_a_failed_request_into_an_error(ckpt):
    eng = build_disagg_engine(ckpt, prefill_devices=[4, 5], decode_devices=[6, 7], dtype=jnp.float32,
                              config=CFG, policy=dataclasses.replace(POLICY, prefill_timeout_s=1e-6),
                              warmup=False)
    prompts = _prompts(6)

    async def main():
        a = AsyncEngine(eng)
        try:
            with pytest.raises(RequestFailedError, match="did not finish"):
                async for _ in a.generate(prompts["long"], GREEDY, "f1"):
                    pass
            assert a.is_healthy
        finally:
            a.shutdown()

    asyncio.run(main())


def test_gather_transfer_scatter_moves_pages_between_tp_degrees(ckpt):
    """Pages of a TP 2 cache land bit-exact in other pages of a TP 4 cache (kv heads replicated there)."""
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig
    devs = jax.devices()
    runners = []
    for tp, d in ((2, devs[:2]), (4, devs[2:6])):
        _, loaded, _ = load_model(ckpt, tp=tp, dtype=jnp.float32, mesh=make_mesh(tp, d))
        runners.append(ModelRunner(loaded.graphdef, loaded.state, make_mesh(tp, d),
                                   RunnerConfig(page_size=16, num_pages=12, max_num_batched_tokens=32,
                                                max_num_seqs=4, max_model_len=128)))
    src, dst = runners
    rng = np.random.default_rng(0)
    src.kv_cache = [tuple(jax.device_put(rng.standard_normal(k.shape).astype(np.float32), k.sharding)
                          for k in pair) for pair in src.kv_cache]
    g = KVGather(src, 2, 8)
    s = KVScatter(dst, 2, 8)
    assert page_buckets(8) == (1, 2, 4, 8)
    src_pages, dst_pages = [3, 0, 7], [9, 4, 1]
    times = measure_handoff(g, s, src_pages, dst_pages, list(range(40)), repeats=2)
    assert all(v > 0 for v in times.values())
    for (sk, sv), (dk, dv) in zip(src.kv_cache, dst.kv_cache):
        sk, sv, dk, dv = map(np.asarray, (sk, sv, dk, dv))
        for a, b in zip(src_pages, dst_pages):
            np.testing.assert_array_equal(dk[:, b], np.repeat(sk[:, a], 2, axis=0))
            np.testing.assert_array_equal(dv[:, b], np.repeat(sv[:, a], 2, axis=0))
        untouched = [p for p in range(12) if p not in dst_pages]
        assert not np.any(dk[:, untouched])
    tp = np.asarray(dst.token_pages)
    assert tp[9].tolist() == list(range(16)) and tp[1][:8].tolist() == list(range(32, 40))
    assert not tp[1][8:].any()


def test_scatter_rounds_a_block_of_another_dtype_into_fp8_pages(ckpt):
    """A float32 prefill cache's block lands in an fp8 (``kv_cache_dtype="fp8"``) decode cache rounded as the
    step's own write rounds it, saturating at +-448, no NaN."""
    from jaxdyn.engine.runner import ModelRunner, RunnerConfig
    from jaxdyn.kv.cache import to_pages_dtype
    devs = jax.devices()
    runners = []
    for d, kv in ((devs[:1], "auto"), (devs[1:2], "fp8")):
        _, loaded, _ = load_model(ckpt, dtype=jnp.float32, mesh=make_mesh(1, d))
        runners.append(ModelRunner(loaded.graphdef, loaded.state, make_mesh(1, d),
                                   RunnerConfig(page_size=16, num_pages=12, max_num_batched_tokens=32,
                                                max_num_seqs=4, max_model_len=128, kv_cache_dtype=kv)))
    src, dst = runners
    assert dst.kv_spec.dtype == jnp.float8_e4m3fn and src.kv_spec.dtype == jnp.float32
    rng = np.random.default_rng(1)
    src.kv_cache = [tuple(jax.device_put((300 * rng.standard_normal(k.shape)).astype(np.float32), k.sharding)
                          for k in pair) for pair in src.kv_cache]
    g, s = KVGather(src, 2, 8), KVScatter(dst, 2, 8)
    s.warmup(jnp.float32)
    compiled = dict(s._compiled)
    s([5, 2], g([1, 6]), list(range(20)))
    assert s._compiled == compiled, "the warmed scatter of float32 blocks compiles nothing more"
    # a block from the host (a remote prefill's, over gRPC) takes the same path
    host = np.asarray(g([3]))
    s([7], host, list(range(5)))
    np.testing.assert_array_equal(np.asarray(dst.kv_cache[0][0].astype(jnp.float32))[:, 7],
                                  np.asarray(to_pages_dtype(src.kv_cache[0][0][:, 3], jnp.float8_e4m3fn)
                                             .astype(jnp.float32)))
    for (sk, _), (dk, _) in zip(src.kv_cache, dst.kv_cache):
        assert dk.dtype == jnp.float8_e4m3fn
        got = np.asarray(dk.astype(jnp.float32))
        assert not np.isnan(got).any() and np.abs(got).max() == 448.0
        for a, b in ((1, 5), (6, 2)):
            np.testing.assert_array_equal(got[:, b], np.asarray(to_pages_dtype(sk[:, a], jnp.float8_e4m3fn)
                                                                  .astype(jnp.float32)))


def test_each_mesh_reports_its_warm_ups_compilation(disagg):
    roles = disagg.load_info["compile_by_role"]
    assert set(roles) == {"prefill", "decode"}
    for summary in roles.values():
        assert summary["parts"] > 0 and summary["compile_s"] > 0 and summary["wall_s"] > 0
