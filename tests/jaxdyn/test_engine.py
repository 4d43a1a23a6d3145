"""The engine end to end on a tiny float32 model: batch invariance under preemption, n > 1,
stop conditions, aborts, logprobs, and every page back in the pool afterwards."""

import asyncio
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineConfig, EngineCore, LLM, RequestError, SamplingParams
from jaxdyn.engine.sampling_params import SamplingParamsError
from tests.support import hf_greedy, hf_model, make_byte_tokenizer, make_hf_checkpoint

CFG = EngineConfig(num_pages=24, page_size=16, max_num_batched_tokens=32, max_num_seqs=16,
                   max_model_len=128, fail_on_compile=True, seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("qwen3")))
    make_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def engine(ckpt, request):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, enable_prefix_caching=request.param))
    core.warmup()
    return core


@pytest.fixture(autouse=True)
def all_pages_free_after(request):
    yield
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        while eng.has_unfinished():          # flush a step still in flight
            eng.step()
        assert eng.allocator.num_in_use == 0, "pages leaked"
        eng.scheduler.check_invariants()
        if eng.prefix_cache is not None:         # what is left is the cache's, and it lets all of it go
            eng.prefix_cache.clear()
        assert eng.allocator.num_free == eng.num_pages, "pages leaked"
        assert eng.metrics.compilations_after_warmup == 0


def run(engine, reqs, arrivals=None):
    """reqs: {id: (prompt, params)}; arrivals: {id: step index at which it is submitted}."""
    arrivals = arrivals or {rid: 0 for rid in reqs}
    results, step = {}, 0
    pending = sorted(reqs, key=lambda r: arrivals[r])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            rid = pending.pop(0)
            engine.add_request(rid, *reqs[rid])
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        step += 1
    return results


def test_greedy_matches_transformers(engine, ckpt):
    ref = hf_model(ckpt)
    prompts = {"a": [256, 5, 6, 7, 8], "b": list(range(30, 70)), "c": [1, 2]}
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out = run(engine, {k: (v, p) for k, v in prompts.items()})
    for k, prompt in prompts.items():
        assert out[k].outputs[0].token_ids == hf_greedy(ref, prompt, 10)[0]


def _workload(seed, sampled: bool):
    rng = np.random.default_rng(seed)
    reqs, arrivals = {}, {}
    for i in range(64):
        prompt = rng.integers(0, 256, int(rng.integers(1, 60))).tolist()
        n_out = int(rng.integers(1, 30))
        if sampled:
            p = SamplingParams(temperature=float(rng.uniform(0.5, 1.5)), top_p=float(rng.uniform(0.7, 1.0)),
                               top_k=int(rng.integers(0, 50)), seed=int(rng.integers(0, 2**31)),
                               max_tokens=n_out, ignore_eos=True)
        else:
            p = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
        reqs[f"r{i}"] = (prompt, p)
        arrivals[f"r{i}"] = int(rng.integers(0, 80))
    return reqs, arrivals


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batch_invariance_under_preemption(engine, sampled):
    reqs, arrivals = _workload(1 if sampled else 0, sampled)
    before = engine.scheduler.num_preemptions
    together = run(engine, reqs, arrivals)
    assert engine.scheduler.num_preemptions > before, "the pool should be small enough to preempt"
    for rid, (prompt, p) in reqs.items():
        alone = run(engine, {rid: (prompt, p)})[rid]
        assert together[rid].outputs[0].token_ids == alone.outputs[0].token_ids, rid
        assert len(alone.outputs[0].token_ids) == p.max_tokens


def test_split_steps_draw_what_whole_steps_draw(engine):
    """Every step of more than 16 tokens run as two 16-token calls (``ModelRunner.plan``, step costs set by
    hand): the seeded, preempting workload draws the same tokens as with whole steps."""
    reqs, arrivals = _workload(2, sampled=True)
    whole = run(engine, reqs, arrivals)
    runner, steps = engine.runner, engine.metrics.steps
    calls = runner.calls_run
    runner.set_step_costs({16: 1.0, 32: 10.0})
    try:
        split = run(engine, reqs, arrivals)
    finally:
        runner.set_step_costs(None)
    assert runner.calls_run - calls > engine.metrics.steps - steps, "steps should have been split"
    for rid in reqs:
        assert split[rid].outputs[0].token_ids == whole[rid].outputs[0].token_ids, rid


@pytest.mark.parametrize("mode", [True, "except_greedy"])
def test_a_separate_sampler_draws_what_one_executable_draws(engine, ckpt, mode):
    """``EngineConfig.separate_sampler``: the seeded, preempting workload (prompt chunks, decode fed back on the
    device with overlap) draws the same tokens through two calls a step as through one ("except_greedy": its
    sampled steps are split, greedy ones would be whole)."""
    if not engine.config.enable_prefix_caching:
        pytest.skip("one engine of each kind is enough")
    reqs, arrivals = _workload(3, sampled=True)
    want = run(engine, reqs, arrivals)
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, separate_sampler=mode))
    core.warmup()
    assert core.runner.config.separate_sampler == mode
    got = run(core, reqs, arrivals)
    for rid in reqs:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids, rid


def test_shared_prefixes_match_transformers_with_eviction_and_preemption(engine, ckpt):
    """Requests over three shared system prompts, and chats that resend their history, on a pool of 24
    pages: the cache hits, evicts and the engine preempts, and every greedy output equals transformers'."""
    ref = hf_model(ckpt)
    rng = np.random.default_rng(5)
    systems = [rng.integers(0, 256, 40).tolist() for _ in range(3)]
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reqs, arrivals = {}, {}
    for i in range(18):
        reqs[f"s{i}"] = (systems[i % 3] + rng.integers(0, 256, int(rng.integers(1, 40))).tolist(), p)
        arrivals[f"s{i}"] = int(rng.integers(0, 30))
    hits, evictions, preemptions = (engine.metrics.prefix_cache_hits, engine.metrics.prefix_cache_evictions,
                                    engine.scheduler.num_preemptions)
    out = run(engine, reqs, arrivals)
    for rid, (prompt, _) in reqs.items():
        assert out[rid].outputs[0].token_ids == hf_greedy(ref, prompt, 10)[0], rid
    # A second turn of each chat: its first prompt, the answer, a new message.
    turn2 = {f"t{i}": (reqs[f"s{i}"][0] + out[f"s{i}"].outputs[0].token_ids + [7, 8, 9], p) for i in range(6)}
    out2 = run(engine, turn2)
    for rid, (prompt, _) in turn2.items():
        assert out2[rid].outputs[0].token_ids == hf_greedy(ref, prompt, 10)[0], rid
    assert engine.scheduler.num_preemptions > preemptions
    if engine.prefix_cache is None:
        assert engine.metrics.prefix_cache_hits == 0
        assert all(o.num_cached_tokens == 0 for o in [*out.values(), *out2.values()])
    else:
        assert engine.metrics.prefix_cache_hits > hits and engine.metrics.prefix_cache_evictions > evictions
        assert sum(o.num_cached_tokens for o in out.values()) >= 32 * 12     # two pages of most systems
        assert any(o.num_cached_tokens >= 48 for o in out2.values())        # history reused


def test_n_samples_share_the_prompt_pages(engine):
    prompt = list(range(10, 50))                      # 40 tokens: 2 full pages + a partial one
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = run(engine, {"one": (prompt, greedy)})["one"].outputs[0].token_ids
    engine.add_request("many", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=3))
    engine.step()                                     # 32 of the 39 shared prompt tokens (or 7, cached)
    engine.step()                                     # the rest: the siblings fork
    running = [s for s in engine.scheduler.running if s.request.request_id == "many"]
    assert len(running) == 3
    first = running[0].pages[0]
    in_cache = engine.prefix_cache is not None
    assert engine.allocator.cached[first] == in_cache
    assert engine.allocator.refcount[first] == 3 + in_cache         # one copy of the prompt's pages
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    assert [c.token_ids for c in out.outputs] == [single] * 3      # copy-on-write kept each intact
    # Seeded samples differ from one another but reproduce.
    p = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=3, seed=7)
    a = run(engine, {"s1": (prompt, p)})["s1"]
    b = run(engine, {"s2": (prompt, p)})["s2"]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_abort_in_the_middle_of_a_prefill_chunk_frees_everything(engine):
    engine.add_request("long", list(range(100)), SamplingParams(max_tokens=5))   # 4 chunks of 32
    engine.add_request("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    held = engine.allocator.num_in_use
    assert held > 0
    final = engine.abort("long")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.allocator.num_in_use < held
    assert engine.abort("long") is None                  # unknown by now: nothing happens
    engine.abort("short")
    assert engine.allocator.num_in_use == 0


def test_a_kv_pool_that_cannot_fit_is_refused_with_its_size(ckpt, monkeypatch):
    """A pool larger than the host's available memory (the CPU's devices share it), huge pages included, is a
    ValueError naming the sizes, raised before anything is allocated (it had been the process killed for memory).
    A page merely larger than a sequence is built, as vLLM builds a block larger than its context."""
    from jaxdyn.engine import core as core_mod
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)

    def build(**kw):
        return EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, dataclasses.replace(CFG, **kw))
    assert build(page_size=256).max_model_len == 128
    monkeypatch.setattr(core_mod, "_host_available_bytes", lambda: 64 << 20)
    with pytest.raises(ValueError, match=r"a KV cache of 24 pages of 100000 tokens needs [\d.]+ GiB"):
        build(page_size=100_000)
    with pytest.raises(ValueError, match=r"a KV cache of 100000 pages of 16 tokens needs [\d.]+ GiB; the host has "
                                         r"0\.06 GiB free for it"):
        build(num_pages=100_000)
    assert build(num_pages=24).num_pages == 24               # what fits is built


def test_an_aborted_request_counts_each_of_its_sequences(engine):
    """``requests_finished`` (``jaxdyn:request_success``) counts sequences by finish reason: an abort of a request of
    n=3 counts 3 aborts, and a sequence that had already ended counts by its own reason."""
    before = dict(engine.metrics.requests_finished)
    engine.add_request("n3", [256, 5, 6], SamplingParams(temperature=1.0, n=3, max_tokens=50, ignore_eos=True, seed=1))
    for _ in range(4):
        engine.step()
    req = engine.requests["n3"]
    req.seqs[1].finish_reason = "length"          # one already ended (as a shorter stop would)
    engine.scheduler.finish(req.seqs[1])
    engine.abort("n3")
    after = engine.metrics.requests_finished
    assert after.get("abort", 0) - before.get("abort", 0) == 2
    assert after.get("length", 0) - before.get("length", 0) == 1


def test_eos_ids_outside_the_vocabulary_are_left_out(ckpt):
    """A config's negative or too-large EOS id (transformers only warns of one) is never drawn, and banned until
    min_tokens a negative one would index another token's logit from the end: the engine keeps the others."""
    import json
    import shutil
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    vocab = loaded.config.vocab_size
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG, eos_token_ids=(-1, 5, vocab))
    assert core.eos_token_ids == (5,)
    odd = ckpt + "-odd-eos"
    shutil.copytree(ckpt, odd, dirs_exist_ok=True)
    with open(odd + "/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [-1, 7, vocab + 3]}, f)
    mesh, loaded, tok = load_model(odd, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    assert 7 in core.eos_token_ids and all(0 <= t < vocab for t in core.eos_token_ids), core.eos_token_ids


def test_stop_token_ids_min_tokens_and_eos(engine):
    prompt = [256, 40, 41, 42]
    free = run(engine, {"f": (prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))})["f"]
    toks = free.outputs[0].token_ids
    stop_id = toks[3]
    first = toks.index(stop_id)
    out = run(engine, {"s": (prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                     ignore_eos=True))})["s"].outputs[0]
    assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    # the stop token's text stays out of the output unless include_stop_str_in_output (vLLM), as EOS's does
    # with skip_special_tokens=False
    dec = engine.tokenizer.decode
    assert out.text == dec(toks[:first]) != dec(toks[:first + 1])
    kept = run(engine, {"k": (prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                      ignore_eos=True, include_stop_str_in_output=True))})["k"]
    assert kept.outputs[0].text == dec(toks[:first + 1])
    # min_tokens bans the stop id (and EOS) until it is reached.
    out = run(engine, {"m": (prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                     min_tokens=first + 2, ignore_eos=True))})["m"].outputs[0]
    assert stop_id not in out.token_ids[:first + 2] and len(out.token_ids) >= first + 2
    # EOS too with ignore_eos, as vLLM bans it (it was drawn; ignore_eos only kept it from ending the sequence)
    out = run(engine, {"i": (prompt, SamplingParams(temperature=0, max_tokens=6, min_tokens=4, ignore_eos=True,
                                                     logit_bias={257: 100.0}))})["i"].outputs[0]
    assert out.token_ids[4:] == [257, 257] and 257 not in out.token_ids[:4], out.token_ids
    # EOS (the tokenizer's </s> = 257) ends a request unless ignore_eos.
    eos_engine_ids = engine.eos_token_ids
    assert 257 in eos_engine_ids
    p = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[])
    outs = run(engine, {f"e{i}": ([256, i], p) for i in range(40)})
    ended = [o.outputs[0] for o in outs.values() if o.outputs[0].finish_reason == "stop"]
    for o in ended:
        assert o.token_ids[-1] == 257 and 257 not in o.token_ids[:-1]
    rid = next(r for r, o in outs.items() if o.outputs[0].finish_reason == "stop")
    shown = run(engine, {"v": ([256, int(rid[1:])], SamplingParams(
        temperature=0, max_tokens=20, stop_token_ids=[], skip_special_tokens=False))})["v"].outputs[0]
    assert shown.token_ids == outs[rid].outputs[0].token_ids and shown.text == outs[rid].outputs[0].text
    assert engine.tokenizer.decode([257], skip_special_tokens=False) not in shown.text
    lengths = [o.outputs[0] for o in outs.values() if o.outputs[0].finish_reason == "length"]
    assert all(len(o.token_ids) == 20 and 257 not in o.token_ids for o in lengths)


def test_stop_strings_end_generation_and_are_cut(engine):
    prompt = [256, 72, 105]
    base = run(engine, {"b": (prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))})["b"]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = run(engine, {"s": (prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     stop=[stop]))})["s"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    out = run(engine, {"i": (prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))})["i"].outputs[0]
    assert out.text == text[:text.index(stop) + len(stop)]


def test_stop_strings_count_from_the_token_after_min_tokens(engine):
    """With min_tokens, a stop string ends the text only where it ends in the text of a token after the first
    min_tokens (vLLM V1's detokenizer): one wholly inside those tokens' text does not end it, even beside a longer
    stop string, nor one the min_tokens-th token completes."""
    prompt = [256, 72, 105]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, allowed_token_ids=list(range(97, 123)))
    text = run(engine, {"b": (prompt, sp)})["b"].outputs[0].text          # letters: a character a token
    assert len(text) == 24
    m = 6
    for stop in ([text[1:3], "z" * 20], [text[m - 2:m]], [text[m - 1:m + 1]]):
        at = min((i for i in range(max(0, m - len(stop[0]) + 1), len(text)) if text.startswith(stop[0], i)),
                 default=None)
        out = run(engine, {"s": (prompt, dataclasses.replace(sp, min_tokens=m, stop=stop))})["s"].outputs[0]
        if at is None:
            assert out.finish_reason == "length" and out.text == text, (stop, out.text)
        else:
            assert out.finish_reason == "stop" and out.stop_reason == stop[0] and out.text == text[:at], (stop, out)


def test_a_stop_string_in_held_text_ends_the_text_whatever_ends_the_sequence(ckpt, tmp_path):
    """A token that completes a stop string and starts another character (byte-level: 中 and two of 文's three
    bytes) has its text held; when an EOS or a stop token ends the sequence next, the held text is searched too:
    the text is cut at the stop string, as when the sequence runs out of length (it had been written out, stop
    string and U+FFFD included)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from jaxdyn.engine.tokenizer import Tokenizer
    from tests.support import _bytes_to_unicode
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab["".join(chars[b] for b in "中".encode() + "文".encode()[:2])] = 256
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.decode([256]) == "中\ufffd" and list(tok.eos_token_ids) == [257], tok.eos_token_ids
    mesh, loaded, _ = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()
    prompt = tok.encode("ok", add_special_tokens=False)
    base = SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[256, 257], stop=["中"])
    cases = {"eos": dataclasses.replace(base, min_tokens=1, logit_bias={257: 100.0}),
             "stop_id": dataclasses.replace(base, allowed_token_ids=[256, 65], min_tokens=1, logit_bias={65: 100.0},
                                        stop_token_ids=[65]),
             "length": dataclasses.replace(base, max_tokens=1, allowed_token_ids=[256])}
    for name, sp in cases.items():
        out = run(core, {name: (prompt, sp)})[name].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == ("", "stop", "中"), (name, out)
    assert core.allocator.num_in_use == 0


def test_a_tiny_temperature_is_vllms_smallest_and_numpy_numbers_are_taken():
    """A temperature in (0, 0.01) is 0.01 (vLLM's clamp; 1.2e-38 overflowed logits / T and drew the lowest id);
    NumPy scalars are taken as Python numbers (vLLM takes them), a bool is still refused."""
    assert SamplingParams(temperature=1.2e-38).temperature == 0.01 and SamplingParams(temperature=0).temperature == 0
    p = SamplingParams(temperature=np.float32(0.5), seed=np.int64(3), top_k=np.int64(3), max_tokens=np.int32(4),
                       allowed_token_ids=[np.int64(5)], logit_bias={np.int64(2): np.float32(1.5)},
                       stop_token_ids=np.array([4, 5]))
    assert (p.temperature, p.seed, p.top_k, p.max_tokens, p.allowed_token_ids, p.logit_bias, p.stop_token_ids) == \
        (0.5, 3, 3, 4, [5], {2: 1.5}, [4, 5])
    assert all(type(v) is int for v in (p.seed, p.top_k, p.max_tokens, *p.allowed_token_ids, *p.stop_token_ids))
    for bad in (dict(temperature=True), dict(n=np.float64(2.0))):
        with pytest.raises(SamplingParamsError):
            SamplingParams(**bad)


def test_logprobs_are_the_models(engine, ckpt):
    import torch
    ref = hf_model(ckpt)
    prompt = [256, 9, 8, 7]
    out = run(engine, {"l": (prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=5,
                                                     ignore_eos=True))})["l"].outputs[0]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:].double()
    want = torch.log_softmax(logits, -1).numpy()
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[tok].rank == 1                       # greedy: the top token
        assert len(entry) == 5
        for tid, lp in entry.items():
            assert abs(lp.logprob - want[i, tid]) < 1e-4
    assert abs(out.cumulative_logprob - sum(want[i, t] for i, t in enumerate(out.token_ids))) < 1e-3


def _want_prompt_logprobs(ckpt, prompt):
    import torch
    with torch.no_grad():
        return torch.log_softmax(hf_model(ckpt)(torch.tensor([prompt])).logits[0].double(), -1).numpy()


def _check_prompt_logprobs(plps, prompt, want, k):
    assert plps[0] is None and len(plps) == len(prompt)
    for i in range(1, len(prompt)):
        entry = plps[i]
        top = np.argsort(-want[i - 1], kind="stable")[:k]
        assert prompt[i] in entry and set(top) <= set(entry) and len(entry) <= k + 1, (i, entry)
        for tid, lp in entry.items():
            assert abs(lp.logprob - want[i - 1, tid]) < 1e-4, (i, tid)
            assert lp.rank == (want[i - 1] >= want[i - 1, tid]).sum(), (i, tid)     # its vocabulary rank
    assert any(e[t].rank > k for e, t in zip(plps[1:], prompt[1:])), "no prompt token outside the top k"


def test_prompt_logprobs_are_the_models(engine, ckpt):
    """``prompt_logprobs``: each prompt token's raw logprob given the ones before it (transformers' log-softmax) and
    the top k, the first token None; a prompt longer than a step's rows is scored over several chunks beside other
    requests; a repeated prompt is computed again (the prefix cache holds no scores) and gives the same; it comes
    in the first output after the prompt and in the final one, once for n > 1."""
    prompt = list(range(40, 97))                   # 57 tokens: 4+ chunks at 16 rows a step
    want = _want_prompt_logprobs(ckpt, prompt)
    reqs = {"p": (prompt, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)),
            "d": ([256, 9, 8], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            "o": (list(range(60, 90)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))}
    for rid, (p, sp) in reqs.items():
        engine.add_request(rid, p, sp)
    seen = []
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "p":
                seen.append((len(out.outputs[0].token_ids), out.finished, out.prompt_logprobs is not None))
            if out.finished:
                finals[out.request_id] = out
    assert seen == [(1, False, True), (2, False, False), (3, True, True)]
    _check_prompt_logprobs(finals["p"].prompt_logprobs, prompt, want, 3)
    assert finals["d"].prompt_logprobs is None and finals["o"].prompt_logprobs is None
    alone = run(engine, {"a": (prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))})["a"]
    assert finals["p"].outputs[0].token_ids == alone.outputs[0].token_ids
    again = run(engine, {"q": (prompt, SamplingParams(max_tokens=2, n=2, seed=1, prompt_logprobs=0))})["q"]
    assert again.num_cached_tokens == 0
    assert [list(e) if e else e for e in again.prompt_logprobs] == [None] + [[t] for t in prompt[1:]]
    for e, f in zip(again.prompt_logprobs[1:], finals["p"].prompt_logprobs[1:]):
        assert next(iter(e.values())).logprob == pytest.approx(next(iter(f.values())).logprob, abs=1e-5)
    one = run(engine, {"1": ([7], SamplingParams(max_tokens=2, prompt_logprobs=5))})["1"]
    assert one.prompt_logprobs == [None]
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(prompt_logprobs=21)
    assert e.value.param == "prompt_logprobs"


def test_cache_salt_shares_cached_prefixes_only_within_a_salt(engine):
    """vLLM's cache_salt: a prompt cached under one salt is a hit for the same salt only (another salt, or none,
    computes it); the tokens are the same either way; offline, a prompt dict's ``cache_salt`` is its salt."""
    prompt = list(range(100, 150))                 # 3 whole pages
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    salted = dataclasses.replace(sp, cache_salt="tenant-a")
    first = run(engine, {"a": (prompt, salted)})["a"]
    cached = {rid: run(engine, {rid: (prompt, p)})[rid]
              for rid, p in (("same", salted), ("other", dataclasses.replace(sp, cache_salt="tenant-b")),
                             ("none", sp), ("none-again", sp))}
    hit = 48 if engine.prefix_cache is not None else 0
    assert first.num_cached_tokens == 0
    assert {rid: o.num_cached_tokens for rid, o in cached.items()} == {"same": hit, "other": 0, "none": 0,
                                                                        "none-again": hit}
    assert all(o.outputs[0].token_ids == first.outputs[0].token_ids for o in cached.values())
    llm = LLM(engine=engine)
    a, b = llm.generate([{"prompt_token_ids": prompt, "cache_salt": "tenant-b"},
                         {"prompt_token_ids": prompt, "cache_salt": "tenant-c"}], sp, use_tqdm=False)
    assert (a.num_cached_tokens, b.num_cached_tokens) == (hit, 0)
    with pytest.raises(SamplingParamsError) as e:
        llm.generate([{"prompt_token_ids": prompt, "cache_salt": ""}], sp, use_tqdm=False)
    assert e.value.param == "cache_salt"


def test_a_prompt_being_scored_leaves_half_the_rows_to_the_others(engine):
    """A scored prompt takes a step's row a position (16 rows a step here): beside other requests it has half of
    them, so a request arriving meanwhile starts at once instead of after the whole prompt; alone it has them all."""
    long = list(range(40, 100))                          # 59 positions to score
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    first: dict[str, int] = {}
    pending = {"s": ([256, 9, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))}
    engine.add_request("p", long, sp)
    step = 0
    while engine.has_unfinished() or pending:
        if step == 1 and pending:
            engine.add_request("s", *pending.pop("s"))
        for out in engine.step():
            first.setdefault(out.request_id, step)
        step += 1
    assert first["s"] <= 4 < first["p"], first           # the short one is not held behind the scoring
    alone_steps = 0
    engine.add_request("p2", long, sp)
    while "p2" not in first:
        for out in engine.step():
            first.setdefault(out.request_id, alone_steps)
        alone_steps += 1
    assert first["p2"] <= 6, first                       # alone: 15 positions a step, 4 steps and the overlap's
    while engine.has_unfinished():
        engine.step()


def test_prompt_logprobs_under_preemption_and_offline(ckpt):
    """Scored prompts in a workload that preempts (a pool of 24 pages): each request's prompt logprobs and tokens
    are those it gets alone, nothing scored twice; ``LLM.generate`` returns them too."""
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()
    rng = np.random.default_rng(3)
    reqs = {f"r{i}": (rng.integers(0, 256, int(rng.integers(20, 60))).tolist(),
                      SamplingParams(temperature=0, max_tokens=int(rng.integers(20, 60)), ignore_eos=True,
                                     prompt_logprobs=int(rng.integers(0, 4)) if i % 2 == 0 else None))
            for i in range(10)}
    together = run(core, reqs)
    assert core.scheduler.num_preemptions > 0, "the pool should be small enough to preempt"
    for rid, (prompt, p) in reqs.items():
        alone = run(core, {rid: (prompt, p)})[rid]
        assert together[rid].outputs[0].token_ids == alone.outputs[0].token_ids, rid
        a, b = together[rid].prompt_logprobs, alone.prompt_logprobs
        if p.prompt_logprobs is None:
            assert a is None and b is None
            continue
        assert len(a) == len(prompt) and [e and sorted(e) for e in a] == [e and sorted(e) for e in b], rid
        for x, y in zip(a[1:], b[1:]):
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-5 and x[t].rank == y[t].rank for t in x)
    assert core.allocator.num_in_use == 0
    llm = LLM(engine=core)
    prompt = list(range(30, 50))
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                       use_tqdm=False)[0]
    _check_prompt_logprobs(out.prompt_logprobs, prompt, _want_prompt_logprobs(ckpt, prompt), 2)


@pytest.mark.parametrize("prompt, params, param", [
    ([], SamplingParams(), "prompt"),
    ([1, 999], SamplingParams(), "prompt"),
    (list(range(128)), SamplingParams(), "prompt"),
    ([1], SamplingParams(stop_token_ids=[5000]), "stop_token_ids"),
])
def test_bad_requests_are_refused(engine, prompt, params, param):
    with pytest.raises(RequestError) as e:
        engine.add_request("bad", prompt, params)
    assert e.value.param == param
    assert not engine.requests


def test_sampling_params_validation_names_the_field():
    from jaxdyn.engine.sampling_params import SamplingParamsError
    for kwargs, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                          (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"),
                          (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop=[""]), "stop"),
                          (dict(presence_penalty=3), "presence_penalty"), (dict(top_k=-2), "top_k"),
                          (dict(stop=5), "stop"), (dict(stop_token_ids=5), "stop_token_ids"),
                          (dict(stop_token_ids="12"), "stop_token_ids"),
                          (dict(stop=["x"], detokenize=False), "stop")]:
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**kwargs)
        assert e.value.param == field


def test_async_engine_streams_and_aborts_on_early_exit(engine):
    async def main():
        eng = AsyncEngine(engine)
        try:
            p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            deltas = []
            async for out in eng.generate([256, 3, 4], p, "stream"):
                deltas.extend(out.outputs[0].delta_token_ids)
                last = out
            assert last.finished and deltas == last.outputs[0].token_ids and len(deltas) == 12
            # Leaving the loop early aborts the request (it would run 100 steps on its own).
            aborts = engine.metrics.requests_finished.get("abort", 0)
            gen = eng.generate([256, 3, 4], SamplingParams(max_tokens=100, ignore_eos=True), "early")
            async for out in gen:
                break
            await gen.aclose()
            for _ in range(200):
                if not engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            assert not engine.requests
            assert engine.metrics.requests_finished.get("abort", 0) == aborts + 1
            # abort(request_id) ends a stream that is still being read, with finish_reason "abort".
            outs = []
            async for out in eng.generate([256, 9, 9], SamplingParams(max_tokens=100, ignore_eos=True), "byid"):
                outs.append(out)
                if len(outs) == 1:
                    eng.abort("byid")
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
            assert len(outs[-1].outputs[0].token_ids) < 100
            assert engine.metrics.requests_finished.get("abort", 0) == aborts + 2
            # A bad request fails its own stream only.
            with pytest.raises(RequestError):
                async for _ in eng.generate([], p, "bad"):
                    pass
        finally:
            eng.shutdown()
    asyncio.run(main())


def test_llm_text_prompts_and_progress(ckpt):
    llm = LLM(ckpt, dtype="float32", num_pages=32, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=128, fail_on_compile=True)
    outs = llm.generate(["héllo", "wörld €"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.prompt_token_ids[0] for o in outs] == [256, 256]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 6 and c.text == llm.tokenizer.decode(c.token_ids)
    assert llm.engine.allocator.num_in_use == 0
    # vLLM's face: the sampling_params keyword, each output's text prompt, the logprobs' token text
    outs = llm.generate(["héllo", [256, 5, 6]], sampling_params=SamplingParams(temperature=0, max_tokens=3,
                                                                             logprobs=2), use_tqdm=False)
    assert [o.prompt for o in outs] == ["héllo", None]
    # a request that ends on a stop string while the next step is already on its way: generate reads that step too,
    # so the engine holds nothing once it returns
    llm.generate(["héllo"], SamplingParams(temperature=0, max_tokens=20, stop=[llm.tokenizer.decode(
        outs[0].outputs[0].token_ids[:2])]), use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.allocator.num_in_use == 0
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("héllo")
    # the text prompts of a batch are tokenized in one call (in parallel), each as encode makes it
    texts = ["héllo", "wörld €", "a b c", ""]
    assert llm.tokenizer.encode_batch(texts) == [llm.tokenizer.encode(t) for t in texts]
    assert llm.tokenizer.encode_batch(texts, add_special_tokens=False) == [
        llm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    for entry in outs[0].outputs[0].logprobs:
        assert all(lp.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False) for t, lp in entry.items())
    # a batch with a prompt the engine refuses raises and leaves nothing queued (the others were queued before)
    with pytest.raises(RequestError):
        llm.generate(["ok", "fine", "x" * 500], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.allocator.num_in_use == 0
    again = llm.generate(["héllo"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert again[0].outputs[0].token_ids == llm.generate(
        ["héllo"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids


def test_llm_queues_in_slices_and_steps_between_them_under_fcfs_only(engine, monkeypatch):
    """``LLM.generate`` queues its prompts in slices (``QUEUE_SLICE``) and, under fcfs, steps between them once the
    waiting requests hold a token budget of work: each step admits what it would with every request queued first
    (the same chunks in the same steps), with distinct prompts, prompts sharing a prefix the cache serves, and a warm
    cache; under lof, or with prompt logprobs to score, everything is queued before the first step."""
    import jaxdyn.engine.llm as llm_mod
    from jaxdyn.engine.scheduler import Scheduler
    llm = LLM(engine=engine)
    events = []
    add, step, schedule = EngineCore.add_request, EngineCore.step, Scheduler.schedule

    def spy_add(self, rid, ids, *a, **k):
        events.append(("add", None))
        return add(self, rid, ids, *a, **k)

    def spy_step(self, *a, **k):
        events.append(("step", None))
        return step(self, *a, **k)

    def spy_schedule(self, *a, **k):
        out = schedule(self, *a, **k)
        events.append(("schedule", sorted((tuple(i.seq.prompt_ids), i.start, i.num_tokens) for i in out.items)))
        return out
    monkeypatch.setattr(EngineCore, "add_request", spy_add)
    monkeypatch.setattr(EngineCore, "step", spy_step)
    monkeypatch.setattr(Scheduler, "schedule", spy_schedule)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    def run(prompts, params=sp, slice_=64, reset=True):
        if reset:
            engine.reset_prefix_cache()
        monkeypatch.setattr(llm_mod, "QUEUE_SLICE", slice_)
        events.clear()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], [e[1] for e in events if e[0] == "schedule"], list(events)

    distinct = [f"prompt number {i} " + "ab" * (i % 5) for i in range(22)]
    shared = ["a shared system prompt of some length, " * 2 + f"then {i}" for i in range(22)]
    for prompts in (distinct, shared):
        want_tokens, want_steps, _ = run(prompts)                    # 22 < 64: all queued before the first step
        tokens, steps, ev = run(prompts, slice_=4)
        assert tokens == want_tokens and steps == want_steps
        adds = [i for i, (kind, _) in enumerate(ev) if kind == "add"]
        assert any(kind == "step" and i < adds[-1] for i, (kind, _) in enumerate(ev)), "no step while queueing"
    # a warm cache: the prompts' pages cached by the run before
    _, want_steps, _ = run(distinct, slice_=64)
    _, want_warm, _ = run(distinct, slice_=64, reset=False)
    engine.reset_prefix_cache()
    run(distinct, slice_=64)
    _, warm, _ = run(distinct, slice_=4, reset=False)
    assert warm == want_warm
    # prompt logprobs to score, or lof (which orders the whole queue by max_tokens): all queued before a step
    scoring = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    monkeypatch.setattr(engine.scheduler, "config", dataclasses.replace(engine.scheduler.config, policy="lof"))
    for params in (sp, scoring):
        _, _, ev = run(distinct, params=params, slice_=4)
        assert [kind for kind, _ in ev[:len(distinct)]] == ["add"] * len(distinct)
        monkeypatch.setattr(engine.scheduler, "config", dataclasses.replace(engine.scheduler.config, policy="fcfs"))
    # a prompt refused in a later slice, after steps ran: raises, and nothing stays queued, in flight or holds pages
    events.clear()
    monkeypatch.setattr(llm_mod, "QUEUE_SLICE", 4)
    with pytest.raises(RequestError):
        llm.generate(distinct[:12] + ["x" * 500], sp, use_tqdm=False)
    assert ("step", None) in events
    assert not engine.requests and not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.has_unfinished() and engine.allocator.num_in_use == 0


def test_llm_without_a_model_serves_the_demo_model(monkeypatch):
    from checkpoints import DEMO_MODEL
    from jaxdyn.engine import llm as llm_mod
    seen = []
    monkeypatch.setattr(llm_mod, "build_engine", lambda model, **kw: seen.append(model) or "engine")
    assert LLM().engine == "engine" and seen == [DEMO_MODEL] and os.path.isdir(DEMO_MODEL)


def _reference_greedy_with_penalties(model, prompt, n, *, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding over transformers' logits with vLLM's penalties applied in numpy:
    repetition over prompt + output, presence and frequency over the output only."""
    import torch
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            seen = np.zeros_like(logits, bool)
            seen[ids] = True
            logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
            counts = np.bincount(out, minlength=logits.size)[:logits.size].astype(np.float64)
            logits = logits - frequency * counts - presence * (counts > 0)
            out.append(int(np.argmax(logits)))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.8), dict(presence_penalty=1.5),
                                       dict(frequency_penalty=0.9),
                                       dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)],
                         ids=["repetition", "presence", "frequency", "all"])
def test_penalties_in_the_engine_match_a_reference(engine, ckpt, penalties):
    ref = hf_model(ckpt)
    prompts = {"a": [256, 5, 6, 5, 6, 5], "b": [7] * 20 + list(range(40, 50))}
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **penalties)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = run(engine, {**{k: (v, p) for k, v in prompts.items()},
                       **{k + "-plain": (v, plain) for k, v in prompts.items()}})
    kw = dict(presence=penalties.get("presence_penalty", 0.0), frequency=penalties.get("frequency_penalty", 0.0),
              repetition=penalties.get("repetition_penalty", 1.0))
    for k, prompt in prompts.items():
        expected = _reference_greedy_with_penalties(ref, prompt, 12, **kw)
        assert out[k].outputs[0].token_ids == expected
        assert out[k + "-plain"].outputs[0].token_ids == hf_greedy(ref, prompt, 12)[0]
    # the penalties change something on this workload (else this test shows nothing)
    assert any(out[k].outputs[0].token_ids != out[k + "-plain"].outputs[0].token_ids for k in prompts)


def test_min_p_one_and_top_k_one_sample_the_argmax(engine, ckpt):
    ref = hf_model(ckpt)
    prompt = [256, 11, 12, 13]
    greedy = hf_greedy(ref, prompt, 10)[0]
    reqs = {f"{name}-{seed}": (prompt, SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, seed=seed, **kw))
            for seed in range(3) for name, kw in (("minp", dict(min_p=1.0)), ("topk", dict(top_k=1)),
                                                   ("topp", dict(top_p=1e-6)))}
    reqs["free"] = (prompt, SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, seed=0))
    out = run(engine, reqs)
    for k in reqs:
        if k != "free":
            assert out[k].outputs[0].token_ids == greedy, k
    assert out["free"].outputs[0].token_ids != greedy   # temperature 1.5 alone does sample


def test_final_only_requests_get_one_output_equal_to_the_streamed_one(engine):
    """``final_only`` (what LLM.generate asks for): no output until the request finishes, then one with
    everything; the same text, tokens, logprobs and finish as the request streamed step by step."""
    prompt = [256, 72, 105]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=12, logprobs=2, stop=["zz"], ignore_eos=True)
    engine.add_request("streamed", prompt, params)
    engine.add_request("final", prompt, params, final_only=True)
    outs = {"streamed": [], "final": []}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    assert len(outs["final"]) == 1 and outs["final"][0].finished and len(outs["streamed"]) > 1
    a, b = outs["streamed"][-1].outputs[0], outs["final"][0].outputs[0]
    assert (b.text, b.token_ids, b.finish_reason, b.cumulative_logprob) == \
        (a.text, a.token_ids, a.finish_reason, a.cumulative_logprob)
    assert b.delta_text == b.text and b.delta_token_ids == b.token_ids and len(b.delta_logprobs) == len(b.token_ids)
    assert [list(d) for d in b.logprobs] == [list(d) for d in a.logprobs]
    assert "".join(o.outputs[0].delta_text for o in outs["streamed"]) == a.text


def test_wire_outputs_carry_the_request_timings_with_the_final_output_only(engine):
    """``step(wire=True)`` (what the engine process sends): each step's deltas, the request's
    ``RequestMetrics`` only with its final output (timings filled in), None before."""
    engine.add_request("w", [256, 72, 105], SamplingParams(max_tokens=5, ignore_eos=True, detokenize=False))
    wires = []
    while engine.has_unfinished():
        wires += engine.step(wire=True)
    assert len(wires) == 5 and [w[1] for w in wires] == [False] * 4 + [True]
    assert all(w[4] is None for w in wires[:-1])
    m = wires[-1][4]
    assert m.first_token_time is not None and m.finished_time is not None and m.arrival_time <= m.first_token_time
    assert len(sum((w[5][0][2] for w in wires), [])) == 5      # one token id a step


def test_triton_gemm_limit_auto_is_for_fp8_models_on_a_gpu():
    """"auto" limits XLA's Triton GEMMs to the few-row steps for an fp8 model on a GPU only; an explicit
    limit or None passes through; anything else is refused."""
    from types import SimpleNamespace

    from jaxdyn.engine.core import FP8_TRITON_GEMM_MAX_TOKENS, triton_gemm_limit
    fp8, bf16 = SimpleNamespace(quantization="fp8"), SimpleNamespace(quantization=None)
    auto = EngineConfig()
    assert triton_gemm_limit(auto, fp8, "gpu") == FP8_TRITON_GEMM_MAX_TOKENS
    assert triton_gemm_limit(auto, fp8, "cpu") is None
    assert triton_gemm_limit(auto, bf16, "gpu") is None
    assert triton_gemm_limit(auto, SimpleNamespace(quantization="int8"), "gpu") is None
    assert triton_gemm_limit(EngineConfig(triton_gemm_max_tokens=0), bf16, "gpu") == 0
    assert triton_gemm_limit(EngineConfig(triton_gemm_max_tokens=None), fp8, "gpu") is None
    for bad in (-1, "some", 1.5, True):
        with pytest.raises(ValueError, match="triton_gemm_max_tokens"):
            EngineConfig(triton_gemm_max_tokens=bad)


def test_fp8_kernel_limit_auto_is_for_fp8_models_on_a_gpu():
    """"auto" is FP8_KERNEL_MAX_TOKENS for an fp8 model on a GPU (0 now: measured slower), 0 elsewhere; a model
    without fp8 weights always resolves to 0 (its steps and their cache key unchanged); bad values refused."""
    from types import SimpleNamespace

    from jaxdyn.engine.core import FP8_KERNEL_MAX_TOKENS, fp8_kernel_limit
    fp8, bf16 = SimpleNamespace(quantization="fp8"), SimpleNamespace(quantization=None)
    auto = EngineConfig()
    assert fp8_kernel_limit(auto, fp8, "gpu") == FP8_KERNEL_MAX_TOKENS
    assert fp8_kernel_limit(auto, fp8, "cpu") == 0
    assert fp8_kernel_limit(auto, bf16, "gpu") == 0
    assert fp8_kernel_limit(EngineConfig(fp8_kernel_max_tokens=16), fp8, "cpu") == 16
    assert fp8_kernel_limit(EngineConfig(fp8_kernel_max_tokens=16), SimpleNamespace(quantization="int8"), "gpu") == 0
    for bad in (-1, "some", 1.5, True, None):
        with pytest.raises(ValueError, match="fp8_kernel_max_tokens"):
            EngineConfig(fp8_kernel_max_tokens=bad)


def test_fp8_fused_quantize_auto_resolves_by_platform_and_model(monkeypatch):
    from types import SimpleNamespace

    from jaxdyn.engine.core import FP8_FUSED_QUANTIZE, fp8_fused_quantize
    fp8, bf16 = SimpleNamespace(quantization="fp8"), SimpleNamespace(quantization=None)
    assert fp8_fused_quantize(EngineConfig(), fp8, "gpu") == FP8_FUSED_QUANTIZE
    assert fp8_fused_quantize(EngineConfig(), fp8, "cpu") == "off"
    assert fp8_fused_quantize(EngineConfig(fp8_fused_quantize="all"), fp8, "cpu") == "all"
    assert fp8_fused_quantize(EngineConfig(fp8_fused_quantize="o_proj"), fp8, "gpu") == "o_proj"
    assert fp8_fused_quantize(EngineConfig(fp8_fused_quantize="all"), bf16, "gpu") == "off"
    from jaxdyn.engine.core import FP8_FUSED_QUANTIZE_MIN_TOKENS, fp8_fused_quantize_min
    assert fp8_fused_quantize_min(EngineConfig(), "gpu") == FP8_FUSED_QUANTIZE_MIN_TOKENS
    assert fp8_fused_quantize_min(EngineConfig(), "cpu") == 0
    from jaxdyn.engine import core
    monkeypatch.setattr(core, "FP8_FUSED_QUANTIZE_MIN_TOKENS", 512)     # "auto" is the GPU's floor, 0 elsewhere
    assert fp8_fused_quantize_min(EngineConfig(), "gpu") == 512 and fp8_fused_quantize_min(EngineConfig(), "cpu") == 0
    assert fp8_fused_quantize_min(EngineConfig(fp8_fused_quantize_min_tokens=7), "gpu") == 7
    for bad in (-1, True, "some", 2.5):
        with pytest.raises(ValueError, match="fp8_fused_quantize_min_tokens"):
            EngineConfig(fp8_fused_quantize_min_tokens=bad)
    for bad in ("yes", True, None):
        with pytest.raises(ValueError, match="fp8_fused_quantize"):
            EngineConfig(fp8_fused_quantize=bad)


def test_fp8_kv_cache_serves_the_models_logprobs_within_fp8_rounding(ckpt):
    """``kv_cache_dtype="fp8"``: the pages are float8_e4m3fn, the logprobs of what the engine draws are
    transformers' (teacher-forced on those tokens) within fp8's rounding of K and V, not bit for bit; the
    preempting workload with shared prefixes runs to the end with every page back in the pool."""
    import torch
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, kv_cache_dtype="fp8"))
    core.warmup()
    assert core.runner.kv_spec.dtype == jnp.float8_e4m3fn
    assert all(k.dtype == jnp.float8_e4m3fn and v.dtype == jnp.float8_e4m3fn for k, v in core.runner.kv_cache)
    ref = hf_model(ckpt)
    prompt = list(range(40, 75))                 # three pages: later tokens read earlier pages from the cache
    out = run(core, {"l": (prompt, SamplingParams(temperature=0, max_tokens=12, logprobs=5,
                                                   ignore_eos=True))})["l"].outputs[0]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:].double()
    want = torch.log_softmax(logits, -1).numpy()
    diffs = [abs(lp.logprob - want[i, tid]) for i, entry in enumerate(out.logprobs) for tid, lp in entry.items()]
    assert max(diffs) < 0.15, max(diffs)
    assert max(diffs) > 1e-5, "fp8 pages should round K and V"
    reqs, arrivals = _workload(4, sampled=False)
    got = run(core, reqs, arrivals)
    assert core.scheduler.num_preemptions > 0
    for rid, (_, p) in reqs.items():
        assert len(got[rid].outputs[0].token_ids) == p.max_tokens, rid
    assert core.allocator.num_in_use == 0
    if core.prefix_cache is not None:
        core.prefix_cache.clear()
    assert core.allocator.num_free == core.num_pages
    assert core.metrics.compilations_after_warmup == 0


def test_kv_cache_dtype_is_checked_and_resolved():
    from jaxdyn.engine.runner import RunnerConfig, kv_cache_dtype
    from jaxdyn.parallel.sharding import make_mesh
    mesh = make_mesh(1)
    assert kv_cache_dtype(jnp.bfloat16, mesh) == jnp.float32            # the CPU widens 16-bit pages
    assert kv_cache_dtype(jnp.bfloat16, mesh, "fp8") == jnp.float8_e4m3fn
    assert kv_cache_dtype(jnp.float32, mesh, "fp8_e4m3") == jnp.float8_e4m3fn
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"     # one name, one cache key
    assert RunnerConfig(kv_cache_dtype="fp8_e4m3") == RunnerConfig(kv_cache_dtype="fp8")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="separate_sampler"):
            EngineConfig(separate_sampler=bad)
        with pytest.raises(ValueError, match="separate_sampler"):
            RunnerConfig(separate_sampler=bad)
    for bad in ("yes", 1, "plain-full"):
        with pytest.raises(ValueError, match="sampler_switch: expected true, false, 'plain_full' or none"):
            EngineConfig(sampler_switch=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="nested_layers: expected true or false"):
            EngineConfig(nested_layers=bad)
    assert EngineConfig().sampler_switch is None and EngineConfig(sampler_switch="plain_full").sampler_switch
    with pytest.raises(ValueError, match="pick one"):
        EngineConfig(sampler_switch="plain_full", separate_sampler=True)
    with pytest.raises(ValueError, match="sampler_switch and separate_sampler .* pick one"):
        EngineConfig(sampler_switch=True, separate_sampler="except_greedy")
    for bad in ("fp16", "e5m2", None):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig(kv_cache_dtype=bad)
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            RunnerConfig(num_pages=8, page_size=16, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64,
                         kv_cache_dtype=bad)


def test_fp8_kv_cache_under_tensor_parallelism_draws_what_one_device_draws(ckpt):
    """fp8 pages sharded over kv heads (TP 2): the greedy tokens of one device's fp8 cache."""
    from jaxdyn.parallel.sharding import make_mesh
    import jax
    cfg = dataclasses.replace(CFG, kv_cache_dtype="fp8")
    prompts = {"a": list(range(40, 75)), "b": [256, 5, 6, 7, 8], "c": list(range(100, 120))}
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for tp in (1, 2):
        mesh, loaded, tok = load_model(ckpt, tp=tp, dtype=jnp.float32, mesh=make_mesh(tp, jax.devices()[:tp]))
        core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
        core.warmup()
        assert core.runner.kv_cache[0][0].dtype == jnp.float8_e4m3fn
        outs.append({k: o.outputs[0].token_ids for k, o in run(core, {k: (v, p) for k, v in prompts.items()}).items()})
        assert core.allocator.num_in_use == 0
    assert outs[0] == outs[1]


def test_attention_programs_and_schedule_policy_are_checked_and_reach_the_engine(ckpt):
    from jaxdyn.engine.runner import RunnerConfig
    for bad in (-1, 2.5, "528", None, True):
        with pytest.raises(ValueError, match="attention_programs"):
            EngineConfig(attention_programs=bad)
        with pytest.raises(ValueError, match="attention_programs"):
            RunnerConfig(attention_programs=bad)
        if bad is not None:         # None: prefill_programs as attention_programs
            with pytest.raises(ValueError, match="prefill_programs"):
                EngineConfig(prefill_programs=bad)
            with pytest.raises(ValueError, match="prefill_programs"):
                RunnerConfig(prefill_programs=bad)
    with pytest.raises(ValueError, match="schedule_policy"):
        EngineConfig(schedule_policy="sjf")
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, attention_programs=528, schedule_policy="lof", prefill_programs=264,
                                          seq_buckets=[(32, 8)]))
    assert core.runner.config.attention_programs == 528 and core.runner.config.prefill_programs == 264
    assert core.runner.config.seq_buckets == ((32, 8),)
    with pytest.raises(ValueError, match="seq_buckets"):
        EngineConfig(seq_buckets=[(32, "8")])
    assert core.scheduler.config.policy == "lof"


def test_the_kernels_page_limit_keeps_a_layers_pool_under_2_31_elements():
    from jaxdyn.config import ModelConfig
    from jaxdyn.engine.core import _kernel_page_limit
    from jaxdyn.parallel.sharding import make_mesh
    from pallas_kernels.paged_decode import max_kernel_pages
    assert max_kernel_pages(8, 16, 128) == 131_071
    assert 8 * 16 * 128 * max_kernel_pages(8, 16, 128) < 2 ** 31 <= 8 * 16 * 128 * (max_kernel_pages(8, 16, 128) + 1)
    from jaxdyn.models.presets import PRESETS
    cfg = ModelConfig.from_dict(PRESETS["llama-3.1-8b"])          # 8 kv heads of 128
    assert _kernel_page_limit(cfg, make_mesh(1), 16) == 131_071
    assert _kernel_page_limit(dataclasses.replace(cfg, num_kv_heads=2, head_dim=64), make_mesh(1), 32) == \
        (2 ** 31 - 1) // (2 * 32 * 64)


def test_reset_prefix_cache_drops_the_cached_prefixes_and_keeps_a_running_sequences_pages(engine):
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = list(range(3, 60))                          # 57 tokens: 3 whole pages of 16
    first = run(engine, {"a": (prompt, p)})["a"]
    engine.add_request("b", list(range(100, 140)), p)    # running while the cache is reset
    engine.step()
    freed = engine.reset_prefix_cache()
    if engine.prefix_cache is None:
        assert freed == 0
    else:
        assert freed >= 3 and engine.prefix_cache.num_pages <= 2   # at most b's own whole pages stay
    assert engine.allocator.num_in_use > 0                # b's pages are still its own
    rest = run(engine, {"a2": (prompt, p)})
    assert rest["a2"].num_cached_tokens == 0              # computed again
    assert rest["a2"].outputs[0].token_ids == first.outputs[0].token_ids
    assert len(rest["b"].outputs[0].token_ids) == 6


@pytest.fixture
def gc_state():
    """Python's collector as it was: thresholds and nothing frozen, back after the test."""
    import gc
    saved = gc.get_threshold()
    gc.unfreeze()
    yield gc
    gc.unfreeze()
    gc.set_threshold(*saved)


@pytest.mark.parametrize("gc_freeze", [True, False, None])
def test_warmup_settles_the_heap_when_asked_and_by_default_on_accelerators_only(ckpt, gc_state, gc_freeze):
    """``EngineConfig.gc_freeze``: after warm-up the collector leaves alone what loading and compiling made
    (frozen); None is off on the CPU (these tests' host)."""
    gc = gc_state
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, gc_freeze=gc_freeze))
    core.runner.warmup = lambda progress=False: 1.5           # the compiled steps are not what this tests
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    assert core.warmup() == 1.5
    if gc_freeze:
        assert gc.get_freeze_count() > 1000                   # the model, JAX's objects, the tokenizer
        assert gc.get_threshold() == before
        assert gc.is_tracked(core.scheduler.running) and not any(
            o is core.scheduler.running for o in gc.get_objects())       # frozen: out of every generation
    else:
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


@pytest.mark.parametrize("switch", [False, True])
def test_a_settled_engine_is_freed_when_dropped(ckpt, gc_state, switch):
    """With the heap frozen, only reference counting frees what the collector no longer scans: an engine (its
    runner, KV cache and weights) must hold no reference cycle, or a process that builds a second engine (the GPU
    suite does) would keep the first one's device memory (with the sampler switch's steps too)."""
    import weakref

    import jax
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      dataclasses.replace(CFG, gc_freeze=True, sampler_switch=switch))
    del loaded
    core.warmup()
    assert gc_state.get_freeze_count() > 0
    out = run(core, {"a": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))})
    assert len(out["a"].outputs[0].token_ids) == 4
    refs = [weakref.ref(core), weakref.ref(core.runner), weakref.ref(jax.tree.leaves(core.runner.kv_cache)[0]),
            weakref.ref(core.runner.state[0])]
    del core, out
    assert [r() is None for r in refs] == [True] * 4


def test_settling_the_heap_again_collects_cycles_frozen_by_the_last_settling(gc_state):
    """Cyclic garbage frozen by one engine's warm-up (say an earlier engine's server loop, dropped after) is
    collected by the next settling, not kept for the life of the process."""
    import weakref

    from jaxdyn.engine.core import settle_heap

    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a                                # a cycle: only the collector frees it
    ref = weakref.ref(a)
    settle_heap()
    del a, b
    gc_state.collect()
    assert ref() is not None                               # frozen: a collection leaves it
    settle_heap()
    assert ref() is None


def test_seeds_are_64_bit(engine):
    """vLLM seeds a 64-bit generator: seeds that differ only above bit 31 draw differently (they had been cut to
    32 bits, so 0 and 2**32 drew the same tokens), a negative seed is its two's complement, and a seed under 2**32
    draws as a sampler row without a high half does. -1 is vLLM's "no seed": each request draws differently (it
    had been the fixed seed 2**64 - 1, so every client sending -1 for a random draw got the same text)."""
    prompt = list(range(10, 30))

    def tokens(seed, tag=""):
        p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=seed)
        return run(engine, {f"s{seed}{tag}": (prompt, p)})[f"s{seed}{tag}"].outputs[0].token_ids

    assert tokens(0) != tokens(2**32)
    assert tokens(5) != tokens(5 + 2**40)
    assert tokens(-2) == tokens(2**64 - 2)
    assert tokens(2**63) == tokens(-2**63)
    assert SamplingParams(seed=-1).seed is None
    assert len({tuple(tokens(-1, k)) for k in "abc"}) > 1


def test_buckets_that_cannot_hold_a_step_are_refused_when_the_engine_is_built(ckpt):
    """A step of max_num_batched_tokens or a sequence of max_model_len the buckets cannot hold failed in the middle
    of serving (the runner finds no bucket for it, and the engine dies with every request): refused up front."""
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    base = EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=128,
                        seed=0)
    for bad, words in (({"page_buckets": (2, 7)}, r"page_buckets: the largest \(7\) must be at least the 8 pages of 16 "
                                                  r"tokens a sequence of max_model_len 128 takes"),
                       ({"token_buckets": (16, 32)}, r"token_buckets: the largest \(32\) must be at least "
                                                     r"max_num_batched_tokens \(64\)")):
        with pytest.raises(ValueError, match=words):
            EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, dataclasses.replace(base, **bad))
    # a sequence's last token is sampled, never computed: 129 tokens take 8 pages of 16, as does a context lowered
    # to what a pool of 8 pages holds (8 x 16 + 1)
    for ok in ({"max_model_len": 129, "page_buckets": (8,)},
               {"max_model_len": None, "num_pages": 8, "page_buckets": (4, 8)}):
        core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, dataclasses.replace(base, **ok))
        assert core.max_model_len == 129


def test_the_pool_bounds_the_context(ckpt, caplog):
    # 5 pages of 16 tokens hold the KV of 80 tokens, so sequences of 81 (the last token is sampled, never
    # computed): a max_model_len over that is refused when set, lowered to it when left to the default.
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    small = EngineConfig(num_pages=5, page_size=16, max_num_batched_tokens=128, max_num_seqs=2, seed=0)
    with pytest.raises(ValueError, match=r"max_model_len 128 exceeds what the KV cache holds: 5 pages of 16 "
                                         r"tokens serve sequences of at most 81 tokens"):
        EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                   dataclasses.replace(small, max_model_len=128))
    with caplog.at_level("WARNING"):
        core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, small)
    assert core.max_model_len == 81 and "max_model_len lowered" in caplog.text
    core.add_request("fits", list(range(1, 80)), SamplingParams(max_tokens=2, ignore_eos=True))
    out = {}
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id] = o
    assert len(out["fits"].outputs[0].token_ids) == 2 and out["fits"].outputs[0].finish_reason == "length"
    assert core.allocator.num_in_use == 0


def test_a_prompt_over_the_pool_is_refused_by_name():
    import types

    from jaxdyn.engine.core import check_request
    facts = types.SimpleNamespace(model_config=types.SimpleNamespace(vocab_size=100), max_model_len=1000,
                                  tokenizer=None, eos_token_ids=[], num_pages=5,
                                  config=types.SimpleNamespace(page_size=16))
    check_request(facts, [1] * 79, SamplingParams(max_tokens=2))
    check_request(facts, [1] * 80, SamplingParams(max_tokens=1))
    for prompt, max_tokens, param in ((79, 3, "max_tokens"), (81, 1, "prompt"), (80, None, "max_tokens")):
        with pytest.raises(RequestError) as e:
            check_request(facts, [1] * prompt, SamplingParams(max_tokens=max_tokens))
        assert e.value.param == param, (prompt, max_tokens)


def test_logit_bias_steers_every_variant(engine):
    # greedy, seeded draws and the full variant (logprobs, penalties): +100 on one id makes it every token; a
    # bias of -100 on the unbiased run's first token moves it; with min_tokens the EOS ban and the bias share a
    # row's block. Logprobs stay the model's raw ones.
    prompt = [5, 17, 42, 9]
    plain = run(engine, {"a": (prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))})["a"]
    first = plain.outputs[0].token_ids[0]
    reqs = {
        "up": (prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={77: 100.0})),
        "down": (prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias={first: -100})),
        "drawn": (prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True,
                                         logit_bias={77: 100.0})),
        "full": (prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, repetition_penalty=1.3,
                                        min_tokens=2, logit_bias={77: 100.0})),
    }
    out = run(engine, reqs)
    for rid in ("up", "drawn", "full"):
        assert out[rid].outputs[0].token_ids == [77] * 4, rid
    assert out["down"].outputs[0].token_ids[0] != first
    lps = out["full"].outputs[0].logprobs
    assert all(lp[77].logprob < -0.5 for lp in lps)        # raw: the bias is not in the logprobs


def test_logit_bias_is_checked(engine):
    for bad in ({5: 10**400}, {5: 1e39}, {5: float("nan")}, {-1: 1.0}):     # float32 overflow would undo a ban
        with pytest.raises(ValueError, match="^logit_bias: "):
            SamplingParams(logit_bias=bad)
    with pytest.raises(SamplingParamsError, match="at most 32 token ids"):      # the parameters' own limit
        SamplingParams(logit_bias={i: 1.0 for i in range(33)})
    # the engine's: ids past the vocabulary; and 32 biases that no longer fit beside min_tokens' banned EOS ids
    params = (SamplingParams(logit_bias={10**6: 1.0}),
              SamplingParams(min_tokens=2, logit_bias={i: 1.0 for i in range(32)}))
    for p, message in zip(params, ("token ids must be in", "with min_tokens and these EOS and stop ids")):
        with pytest.raises(RequestError, match=message) as e:
            engine.add_request("bad", [1, 2], p)
        assert e.value.param == "logit_bias"
    assert not engine.requests


def test_allowed_token_ids_restrict_every_draw(engine):
    # greedy: the allowed id with the highest raw logprob (the logprobs are the model's raw ones), every token; a
    # seeded draw and penalties stay inside the set; a logit_bias on an id outside it does not let it in, one on an
    # id inside moves it; min_tokens' EOS ban still holds for an allowed EOS; rows without a set share the step
    prompt = [5, 17, 42, 9]
    probe = run(engine, {"a": (prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20,
                                                      ignore_eos=True))})["a"]
    raw = probe.outputs[0].logprobs[0]                               # the first position's top 20, raw
    ranked = sorted(raw, key=lambda t: -raw[t].logprob)
    allowed = [ranked[12], ranked[4], ranked[8]]                     # none the unrestricted choice
    reqs = {
        "greedy": (prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, allowed_token_ids=allowed,
                                          logprobs=0)),
        "drawn": (prompt, SamplingParams(max_tokens=6, temperature=1.5, seed=4, ignore_eos=True,
                                         allowed_token_ids=allowed, repetition_penalty=1.5, top_k=50)),
        "bias_out": (prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, allowed_token_ids=[3, 77],
                                            logit_bias={101: 100.0})),
        "bias_in": (prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, allowed_token_ids=[3, 77],
                                           logit_bias={3: 100.0, 77: -100.0})),
        "free": (prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
    }
    if engine.eos_token_ids:
        eos = engine.eos_token_ids[0]
        reqs["eos"] = (prompt, SamplingParams(max_tokens=3, temperature=0.0, min_tokens=2,
                                              allowed_token_ids=[eos, 101], logit_bias={eos: 100.0}))
    out = run(engine, reqs)
    for rid in ("greedy", "drawn"):
        assert set(out[rid].outputs[0].token_ids) <= set(allowed), rid
    assert len(set(out["drawn"].outputs[0].token_ids)) > 1           # a draw, not one forced id
    assert out["bias_out"].outputs[0].token_ids[0] in (3, 77)
    assert out["bias_in"].outputs[0].token_ids == [3, 3, 3]
    free = run(engine, {"f": reqs["free"]})["f"]
    assert out["free"].outputs[0].token_ids == free.outputs[0].token_ids
    # the first greedy token: the best of the set by the raw logprobs, which stay the model's
    first = out["greedy"].outputs[0].token_ids[0]
    assert first == ranked[4] != ranked[0]
    assert out["greedy"].outputs[0].logprobs[0][first].logprob == pytest.approx(raw[first].logprob, abs=1e-4)
    if "eos" in out:
        toks = out["eos"].outputs[0].token_ids
        assert toks[:2] == [101, 101] and toks[2] == engine.eos_token_ids[0]
    assert not engine.requests and engine.allocator.num_in_use == 0


def test_allowed_token_ids_are_checked(engine):
    for bad in ([], [-1], ["3"], 5, [1.5]):
        with pytest.raises(ValueError, match="^allowed_token_ids: "):
            SamplingParams(allowed_token_ids=bad)
    with pytest.raises(ValueError, match="^allowed_token_ids: at most 31"):
        SamplingParams(allowed_token_ids=list(range(32)))
    assert SamplingParams(allowed_token_ids=[4] * 40).allowed_token_ids == [4] * 40      # 1 distinct id
    for params, param in ((SamplingParams(allowed_token_ids=[10**6]), "allowed_token_ids"),
                          (SamplingParams(allowed_token_ids=list(range(20)), logit_bias={i: 1.0 for i in range(20)}),
                           "allowed_token_ids")):
        with pytest.raises(RequestError) as e:
            engine.add_request("bad", [1, 2], params)
        assert e.value.param == param
    with pytest.raises(RequestError, match="no room: logit_bias and min_tokens' bans take 32"):
        engine.add_request("bad", [1, 2], SamplingParams(logit_bias={i: 1.0 for i in range(32)},
                                                         allowed_token_ids=[5]))
    if engine.eos_token_ids:      # nothing left to draw while min_tokens bans every allowed id
        with pytest.raises(RequestError, match="every allowed id is an EOS or stop id") as e:
            engine.add_request("bad", [1, 2], SamplingParams(min_tokens=2, allowed_token_ids=[
                engine.eos_token_ids[0], 9], stop_token_ids=[9]))
        assert e.value.param == "allowed_token_ids"
        # with ignore_eos too (vLLM bans EOS until min_tokens whatever ignore_eos says)
        with pytest.raises(RequestError, match="every allowed id is an EOS or stop id"):
            engine.add_request("bad", [1, 2], SamplingParams(min_tokens=1, ignore_eos=True, max_tokens=2,
                                                             allowed_token_ids=[engine.eos_token_ids[0]]))
        engine.add_request("ok", [1, 2], SamplingParams(min_tokens=1, ignore_eos=True, max_tokens=2,
                                                        allowed_token_ids=[engine.eos_token_ids[0], 9]))
        engine.abort("ok")
    assert not engine.requests


def test_a_row_without_params_still_draws_from_its_allowed_set(engine):
    # the runner takes the set from the row (SequenceWork.allowed), not from its params: the full variant runs
    from jaxdyn.engine.runner import SequenceWork
    r = engine.runner
    pages = list(engine.allocator.allocate(1))
    try:
        for params in (None, SamplingParams(temperature=0)):
            out = r.execute([SequenceWork([1, 2, 3, 4], 0, pages, params=params, allowed=(65, 66))]).result()
            assert int(out.next_token_ids[0]) in (65, 66), params
    finally:
        engine.allocator.free(pages)


def test_engine_config_names_a_bad_field():
    for kw, field in ((dict(max_num_seqs=0), "max_num_seqs"), (dict(page_size=0), "page_size"),
                      (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"), (dict(num_pages=0), "num_pages"),
                      (dict(max_model_len=0), "max_model_len"), (dict(kv_memory_fraction=1.5), "kv_memory_fraction"),
                      (dict(max_num_seqs=True), "max_num_seqs")):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            EngineConfig(**kw)


def test_llm_takes_vllms_prompt_forms_and_names_what_it_cannot(engine):
    from jaxdyn.engine.llm import _prompt_list
    assert _prompt_list({"prompt": "hi"}) == ["hi"] and _prompt_list(np.array([3, 4])) == [[3, 4]]
    got = _prompt_list([{"prompt_token_ids": [1, 2]}, "x", (5, np.int64(6)), {"prompt_token_ids": np.array([7])}])
    assert got == [[1, 2], "x", [5, 6], [7]] and type(got[2][1]) is int
    for bad, where in ((5, "prompts"), (None, "prompts"), ([None], r"prompts\[0\]"), ([[1, "a"]], r"prompts\[0\]"),
                       ({"prompt": "x", "extra": 1}, "prompt"), ({"prompt_token_ids": 7}, "prompt"),
                       ([{"prompt": "x", "multi_modal_data": {"image": 1}}], r"prompts\[0\]")):
        with pytest.raises(TypeError, match=f"^{where}:"):
            _prompt_list(bad)
    llm = LLM(engine=engine)
    sp = SamplingParams(max_tokens=2, temperature=0.0)
    a, b = llm.generate([{"prompt_token_ids": [256, 72]}, [256, 72]], sp, use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(TypeError, match="sampling_params: expected SamplingParams"):
        llm.generate([[256, 72]], {"temperature": 0}, use_tqdm=False)
    assert not engine.requests


def test_a_tokenizer_json_saved_padded_or_truncated_still_encodes_each_prompt_whole(tmp_path):
    # the tokenizers library keeps padding and truncation in tokenizer.json and applies them to every encode: a
    # batch's prompts padded to the longest, a long prompt silently cut; a prompt is all of its text's tokens
    import shutil

    from tokenizers import Tokenizer as HFTokenizer

    from checkpoints import DEMO_MODEL
    from jaxdyn.engine.tokenizer import Tokenizer
    plain = Tokenizer.from_pretrained(DEMO_MODEL)
    texts = ["Hello there, my lord", "a", "To be or not to be. " * 20]
    want = [plain.encode(t) for t in texts]
    assert len(want[2]) > 16 and len(want[1]) < len(want[0])
    for name, setup in (("padded", lambda t: t.enable_padding(pad_id=1, pad_token="</s>")),
                        ("truncated", lambda t: t.enable_truncation(max_length=8))):
        d = tmp_path / name
        shutil.copytree(DEMO_MODEL, d)
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
        setup(hf)
        hf.save(str(d / "tokenizer.json"))
        tok = Tokenizer.from_pretrained(str(d))
        assert tok.encode_batch(texts) == want, name
        assert [tok.encode(t) for t in texts] == want, name


def test_fp8_products_off_the_gpu_are_said_to_do_nothing(ckpt, caplog):
    """``attention_fp8_products`` acts in the GPU decode kernel under a 16-bit model only: elsewhere the engine says
    so at start (the CPU's reference attention multiplies as before) and serves as it would without it."""
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    cfg = EngineConfig(num_pages=8, page_size=16, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=64,
                       kv_cache_dtype="fp8", seed=0)
    with caplog.at_level("WARNING", logger="jaxdyn.engine.core"):
        EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)
    assert "attention_fp8_products" not in caplog.text
    with caplog.at_level("WARNING", logger="jaxdyn.engine.core"):
        EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                   dataclasses.replace(cfg, attention_fp8_products="qk"))
    assert "attention_fp8_products qk takes effect in the GPU decode kernel under a 16-bit model only" in caplog.text


def test_a_prefilled_request_refused_frees_the_pages_reserved_for_it(engine):
    """``add_prefilled``'s refusals give back the pages ``reserve_kv`` set aside (n other than 1 kept them)."""
    from jaxdyn.engine.core import RequestError
    free = engine.allocator.num_free
    for params, words in ((SamplingParams(max_tokens=3, n=2), "n=1"),
                          (SamplingParams(max_tokens=3, stop_token_ids=[10**6]), "token ids must be in")):
        assert engine.reserve_kv("pre", 20) is not None and engine.allocator.num_free < free
        with pytest.raises(RequestError, match=words):
            engine.add_prefilled("pre", list(range(1, 21)), params, seed=0, first_token=5)
        assert "pre" not in engine.scheduler.reserved and engine.allocator.num_free == free


def test_a_ctrl_c_during_generate_leaves_the_engine_usable(engine, monkeypatch):
    """A SIGINT arriving as a compiled step returns (before the runner stores the new KV arrays) raised
    KeyboardInterrupt there: the runner kept the donated, deleted buffers and every later step failed. generate holds
    SIGINT until the step returns: it still raises KeyboardInterrupt, and the next generate works."""
    import signal
    import threading
    assert threading.current_thread() is threading.main_thread()
    # Python's own handler, whatever the launcher left (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_during_generate(engine, monkeypatch, signal)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_generate(engine, monkeypatch, signal):
    llm = LLM(engine=engine)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = llm.generate([[256, 5, 6, 7]], sp, use_tqdm=False)[0].outputs[0].token_ids
    runner = engine.runner
    real = runner._compile
    calls = [0]

    def compile_(*a, **k):
        compiled = real(*a, **k)

        def call(*args):
            out = compiled(*args)
            calls[0] += 1
            if calls[0] == 3:                      # the signal lands as the step returns
                os.kill(os.getpid(), signal.SIGINT)
            return out
        return call
    monkeypatch.setattr(runner, "_compile", compile_)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[256, 5, 6, 7, i] for i in range(4)], sp, use_tqdm=False)
    monkeypatch.undo()
    assert calls[0] >= 3 and not engine.requests
    assert llm.generate([[256, 5, 6, 7]], sp, use_tqdm=False)[0].outputs[0].token_ids == want


def test_generate_from_two_threads_runs_one_call_after_the_other(engine):
    """Two threads' generate raced on one engine (its step is not thread-safe: donated buffers deleted under the
    other, or one caller's outputs collected by the other, which then waited for good): they now run in turn,
    each with its own outputs."""
    import threading
    llm = LLM(engine=engine)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = {k: [o.outputs[0].token_ids for o in llm.generate([[256, k, j] for j in range(4)], sp, use_tqdm=False)]
            for k in (20, 30)}
    got, errors = {}, []

    def run(k):
        try:
            got[k] = [o.outputs[0].token_ids for o in llm.generate([[256, k, j] for j in range(4)], sp,
                                                                   use_tqdm=False)]
        except Exception as e:             # noqa: BLE001 -- reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in (20, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert got == want


def test_llm_refuses_a_bad_token_id_prompt_before_anything_runs_and_ignores_no_argument(engine):
    """A bad token-id prompt late in a batch (past the first slice) was refused only after steps had run for the
    others (thrown away, counted as aborts); now before anything runs, naming the prompt. An empty params list is
    a length mismatch (it gave every prompt the defaults); engine settings beside a built engine are refused (they
    were ignored)."""
    from jaxdyn.engine.llm import QUEUE_SLICE
    llm = LLM(engine=engine)
    steps = engine.metrics.steps
    finished = dict(engine.metrics.requests_finished)
    prompts = [[256, 5, i % 200] for i in range(QUEUE_SLICE + 6)] + [[5, 99999]]
    with pytest.raises(RequestError, match=rf"prompts\[{QUEUE_SLICE + 6}\]: token ids must be integers"):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert engine.metrics.steps == steps and engine.metrics.requests_finished == finished and not engine.requests
    with pytest.raises(ValueError, match="0 sampling params for 2 prompts"):
        llm.generate([[256, 5], [256, 6]], [], use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_seqs would be ignored"):
        LLM(engine=engine, max_num_seqs=4)


def test_engine_settings_that_failed_later_are_refused_where_given():
    """A context of 1 token (every request refused), a bucket of 0 (a ZeroDivisionError from inside the warm-up);
    on a GPU, a page size or head_dim not a power of two (the kernels' lowering failed in the warm-up, naming
    neither)."""
    from jaxdyn.engine.core import check_gpu_kernel_shapes
    with pytest.raises(ValueError, match="max_model_len: expected None or an integer >= 2"):
        EngineConfig(max_model_len=1)
    for name in ("token_buckets", "page_buckets"):
        for bad in ((0, 32), (), (16, 2.5), "16"):
            with pytest.raises(ValueError, match=f"{name}: expected integers >= 1"):
                EngineConfig(**{name: bad})
    assert EngineConfig(token_buckets=(64, 16, 64)).token_buckets == (16, 64)
    check_gpu_kernel_shapes(16, 128)
    check_gpu_kernel_shapes(1, 64)
    with pytest.raises(ValueError, match="page_size 24: the GPU attention kernels"):
        check_gpu_kernel_shapes(24, 128)
    with pytest.raises(ValueError, match="head_dim 80: the GPU attention kernels"):
        check_gpu_kernel_shapes(16, 80)


def test_a_logprob_list_padded_past_the_vocabulary_keeps_each_tokens_own_value():
    """Asking for more top logprobs than the vocabulary has: the sampler pads the ids with 0 at -inf, and a pad
    replaced token 0's real entry (-inf, rank 20)."""
    from jaxdyn.engine.core import _logprob_entry
    from jaxdyn.engine.sampler import RANK_COL
    ids = np.zeros(RANK_COL + 1, np.int64)
    ids[:3] = [3, 0, 5]
    ids[RANK_COL] = 1
    lps = np.full(RANK_COL + 1, -np.inf, np.float32)
    lps[:3] = [-1.0, -2.0, -3.0]
    entry = _logprob_entry(3, -1.0, ids, lps, min(8, RANK_COL))
    assert entry[0].logprob == -2.0 and entry[0].rank == 2 and entry[5].rank == 3 and entry[3].rank == 1


def test_the_gauges_count_an_n_request_s_siblings_with_their_leader_and_an_abort_at_once(engine):
    """An n = 3 request's siblings wait blocked on their leader's prompt: the gauges count them where the leader
    is (3 running while it prefills, as vLLM's n children run together; they read as a queue on an idle engine);
    an abort updates the gauges at once (without overlap no step might come after the last request's abort)."""
    engine.add_request("fork", list(range(1, 40)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=3))
    engine.step()                                   # the leader's first chunk of 32
    m = engine.metrics
    assert (m.num_running, m.num_waiting) == (3, 0)
    assert sum(s.blocked for s in engine.scheduler.waiting) == 2
    engine.abort("fork")
    assert (m.num_running, m.num_waiting, m.kv_pages_used) == (0, 0, engine.allocator.num_in_use)
    assert not engine._forking
    engine.add_request("queued", list(range(1, 40)), SamplingParams(max_tokens=2, n=3))
    assert engine.abort("queued") is not None and not engine._forking
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=2))
    engine.step()
    assert (m.num_running, m.num_waiting) == (1, 0)
    engine.abort("plain")
    assert (m.num_running, m.num_waiting) == (0, 0)
