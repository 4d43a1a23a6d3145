"""The server over the engine in its own process (``ProcessEngine``, ``jaxdyn serve``'s default): the same
answers as the engine on a thread, aborts and refusals crossing the pipe, the engine's metrics exported, no
pages left, and a killed engine process reported rather than hung on."""

import asyncio
import json
import os
import signal
import time

import httpx
import jax.numpy as jnp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineCore, RequestError, SamplingParams
from jaxdyn.engine.process import EngineStartError, ProcessEngine
from serving.app import ServerState
from serving.cli import DEMO_MODEL
from tests.serving.test_server import CFG, TEMPLATE, Server  # noqa: F401 -- ckpt is a fixture
from tests.serving.test_server import ckpt  # noqa: F401
from tests.support import make_byte_tokenizer, make_hf_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def thread_server(ckpt):  # noqa: F811
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    core.warmup()
    state = ServerState("tiny", max_queued_requests=64)
    state.engine = AsyncEngine(core)
    srv = Server(state)
    yield srv
    srv.stop()
    state.engine.shutdown()


@pytest.fixture(scope="module")
def proc_server(ckpt):  # noqa: F811
    state = ServerState("tiny", max_queued_requests=64)
    state.engine = ProcessEngine(ckpt, dtype="float32", config=CFG)
    srv = Server(state)
    yield srv
    srv.stop()
    state.engine.shutdown()
    assert not state.engine._proc.is_alive()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            if "le" not in labels:
                out[s.name + (json.dumps(labels, sort_keys=True) if labels else "")] = s.value
    return out


def settled(url: str, timeout: float = 30.0) -> dict[str, float]:
    """/metrics once the engine has nothing running or waiting and holds no pages for requests."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["jaxdyn:num_requests_running"] == 0 and m["jaxdyn:num_requests_waiting"] == 0
                and m["jaxdyn:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


REQUESTS = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                         "stream": True}),
    ("/v1/completions", {"prompt": [[256, 72], [256, 73]], "n": 2, "max_tokens": 10, "temperature": 0.9,
                         "seed": 7, "logprobs": 2, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 20, "temperature": 1.0, "seed": 3, "stop": ["e", "x"],
                         "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "temperature": 0.7, "seed": 1, "logprobs": True, "top_logprobs": 3,
                              "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "temperature": 0, "stream": True, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                         "echo": True, "logprobs": 2}),
    ("/v1/completions", {"prompt": [[256, 72, 9, 8], [256, 73]], "n": 2, "max_tokens": 4, "temperature": 0.9,
                         "seed": 7, "prompt_logprobs": 3, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "temperature": 0, "prompt_logprobs": 1, "ignore_eos": True}),
]


def answer(url: str, path: str, body: dict):
    """The response with its ids and timestamps taken out (they differ run to run); a stream as each
    choice's joined text / content, logprobs and finish reason, and its usage (how a stream is cut into
    chunks depends on timing: a consumer behind gets deltas folded)."""
    r = httpx.post(url + path, json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        j = r.json()
        j.pop("id"), j.pop("created")
        return j
    choices, usage, tail = {}, None, []
    for ev in r.text.split("\n\n"):
        if not ev.startswith("data: {"):
            tail += [ev] if ev else []
            continue
        j = json.loads(ev[6:])
        usage = j.get("usage") or usage
        for ch in j["choices"]:
            c = choices.setdefault(ch["index"], {"text": "", "logprobs": [], "finish_reason": None})
            c["text"] += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
            c["logprobs"].append(ch.get("logprobs"))
            c["finish_reason"] = ch.get("finish_reason") or c["finish_reason"]
    for c in choices.values():
        c["logprobs"] = [x for x in c["logprobs"] if x]
    return choices, usage, tail


def test_answers_equal_the_engine_on_a_thread(thread_server, proc_server):
    for path, body in REQUESTS:
        assert answer(proc_server.url, path, body) == answer(thread_server.url, path, body), (path, body)


def test_a_stop_tokens_text_is_left_out_as_by_the_engine_on_a_thread(thread_server, proc_server):
    """Text decoded on the server side (no stop string): the stop token that ends a sequence stays out of it unless
    include_stop_str_in_output, as the engine leaves it out."""
    base = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = httpx.post(thread_server.url + "/v1/completions", json={"model": "tiny", **base},
                      timeout=60).json()["choices"][0]["text"]
    ids = httpx.post(thread_server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                     timeout=60).json()["tokens"]
    body = {**base, "stop_token_ids": [ids[3]]}
    cut = answer(thread_server.url, "/v1/completions", body)
    assert cut["choices"][0]["finish_reason"] == "stop" and len(cut["choices"][0]["text"]) < len(text)
    for extra in ({}, {"stream": True}, {"include_stop_str_in_output": True}):
        assert answer(proc_server.url, "/v1/completions", {**body, **extra}) == \
            answer(thread_server.url, "/v1/completions", {**body, **extra}), extra


def test_concurrent_streams_and_the_exported_metrics(proc_server):
    before = settled(proc_server.url)
    body = {"model": "tiny", "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            async def one(i):
                text = ""
                async with c.stream("POST", proc_server.url + "/v1/completions",
                                    json={**body, "prompt": f"request {i}"}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text
            return await asyncio.gather(*[one(i) for i in range(24)])     # more than max_num_seqs (16)

    texts = asyncio.run(run())
    assert all(texts)
    after = settled(proc_server.url)
    assert after["jaxdyn:generation_tokens_total"] - before["jaxdyn:generation_tokens_total"] == 24 * 16
    assert after["jaxdyn:engine_steps_total"] > before["jaxdyn:engine_steps_total"]
    assert after["jaxdyn:compilations_after_warmup_total"] == 0
    assert after["jaxdyn:time_to_first_token_seconds_count"] - before["jaxdyn:time_to_first_token_seconds_count"] == 24


def test_a_client_that_leaves_aborts_the_request_in_the_engine_process(proc_server):
    before = settled(proc_server.url)
    body = {"model": "tiny", "prompt": "leave", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", proc_server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    after = settled(proc_server.url)
    key = 'jaxdyn:request_success_total{"finished_reason": "abort"}'
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after["jaxdyn:kv_cache_usage_perc"] == 0 and after["jaxdyn:num_requests_running"] == 0


def test_refusals(proc_server):
    r = httpx.post(proc_server.url + "/v1/completions", json={"model": "tiny", "prompt": [1] * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # A request the server did not check: the engine process refuses it and the refusal comes back.
    engine = proc_server.state.engine

    async def run():
        with pytest.raises(RequestError) as e:
            async for _ in engine.generate([], SamplingParams(max_tokens=2), "unchecked"):
                pass
        return e.value

    assert asyncio.run(run()).param == "prompt"
    assert engine.num_unfinished == 0 and engine.is_healthy


def test_a_killed_engine_process_ends_streams_with_an_error_and_health_turns_503(proc_server):
    # Last in this module: it kills the module's engine.
    url = proc_server.url
    body = {"model": "tiny", "prompt": "doomed", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                events.append(line)
            if len(events) == 2:
                os.kill(proc_server.state.engine.pid, signal.SIGKILL)
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])
    assert "error" in err and "engine process exited" in err["error"]["message"]
    assert httpx.get(url + "/health").status_code == 503
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"]


def test_an_engine_that_cannot_be_built_says_why(tmp_path):
    with pytest.raises(EngineStartError, match="no_such_model"):
        ProcessEngine(str(tmp_path / "no_such_model"), config=CFG)


def test_jaxdyn_serve_starts_its_engine_process_before_it_imports_jax(tmp_path):
    """The engine process's start-up runs while the server imports its own stack: when serve starts it,
    the server has not imported JAX, and the engine's config goes as plain fields."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "import jaxdyn.engine.boot as boot\n"
        "def start(build):\n"
        "    print('jax imported:', 'jax' in sys.modules, '| config:', type(build['config']).__name__,\n"
        "          build['config']['max_num_seqs'], build['model'] == sys.argv[1], flush=True)\n"
        "    raise SystemExit(7)\n"
        "boot.start_engine_process = start\n"
        "from serving.cli import main\n"
        "main(['serve', '--model', sys.argv[1], '--max-num-seqs', '3', '--port', '0'])\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", code, DEMO_MODEL], capture_output=True, text=True, timeout=120,
                       cwd=root)
    assert p.returncode == 7, p.stdout + p.stderr
    assert "jax imported: False | config: dict 3 True" in p.stdout


def test_text_is_decoded_on_the_server_side_unless_a_stop_string_can_end_it():
    """The engine process gets ``detokenize=False`` for a request no stop string can end (the reader thread
    decodes its tokens); with stop strings, or without a tokenizer, the engine decodes as given."""
    import types

    from jaxdyn import SamplingParams
    from jaxdyn.engine.async_engine import _Stream
    from jaxdyn.engine.process import ProcessEngine
    me = types.SimpleNamespace(core=types.SimpleNamespace(tokenizer=object()))
    s = _Stream(None)
    p = ProcessEngine._prepare(me, s, SamplingParams(max_tokens=3, skip_special_tokens=False))
    assert p.detokenize is False and p.max_tokens == 3 and s.detok == {} and s.skip_special_tokens is False
    for params, tokenizer in ((SamplingParams(stop=["x"]), object()), (SamplingParams(), None),
                              (SamplingParams(detokenize=False), object())):
        s = _Stream(None)
        me.core.tokenizer = tokenizer
        assert ProcessEngine._prepare(me, s, params) is params and s.detok is None


def test_an_output_the_server_cannot_decode_fails_that_request_only():
    """The reader thread decodes text: a failure there ends that request's stream with an error and aborts it
    in the engine; the other streams go on (the reader does not die, leaving every stream hanging)."""
    import asyncio
    import types

    from jaxdyn import SamplingParams
    from jaxdyn.engine.async_engine import RequestFailedError, StreamingEngine
    from jaxdyn.engine.process import ProcessEngine

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            if 13 in ids:
                raise RuntimeError("cannot decode 13")
            return "".join(chr(97 + i % 26) for i in ids)

    sent = []
    pe = ProcessEngine.__new__(ProcessEngine)
    StreamingEngine.__init__(pe, None)
    pe.core = types.SimpleNamespace(tokenizer=Tok())
    pe._send = sent.append

    async def run():
        a = pe.add_request([1, 2], SamplingParams(max_tokens=4), "a")
        b = pe.add_request([1, 2], SamplingParams(max_tokens=4), "b")
        pending = {}
        wire = lambda rid, ids: (rid, False, 0, None, None, [(0, "", ids, None, None, None, None)], None)  # noqa: E731
        pe._handle([("o", wire("a", [13])), ("o", wire("b", [3, 4]))], pending)
        (items,) = pending.values()
        return a, b, items

    a, b, items = asyncio.run(run())
    got = {s.request_id: out for s, out in items}
    assert isinstance(got["a"], RequestFailedError) and "cannot decode 13" in str(got["a"])
    assert got["b"].outputs[0].text == "de"
    assert ("abort", "a") in sent and "a" not in pe._streams and "b" in pe._streams


def test_a_dead_engines_gauges_read_zero(caplog):
    # The reader of a process whose engine is gone: its last snapshot had a request running on 6 pages; those
    # are gone with it (the server's /metrics showed them as held for as long as it ran on). The death is logged
    # (an engine killed for memory left no line in the server's log).
    import dataclasses
    import types

    from jaxdyn.engine.metrics import EngineMetrics

    class Gone:
        def recv_bytes(self):
            raise EOFError

    last = EngineMetrics(num_running=1, num_waiting=2, kv_pages_used=6, kv_pages_cached=3, kv_pages_total=160,
                         generation_tokens=40)
    pe = ProcessEngine.__new__(ProcessEngine)
    pe._conn, pe._closing, pe.dead = Gone(), False, None
    pe._proc = types.SimpleNamespace(join=lambda t: None, exitcode=-9)
    pe.core = types.SimpleNamespace(metrics=last)
    failed = []
    pe._fail_all = lambda err, pending: failed.append(err)
    with caplog.at_level("ERROR", logger="jaxdyn.engine.process"):
        pe._read_loop()
    assert failed and "exited (code -9)" in str(pe.dead)
    logged = [r for r in caplog.records if r.name == "jaxdyn.engine.process"]
    assert [r.levelname for r in logged] == ["ERROR"] and "exited (code -9)" in logged[0].message
    assert pe.core.metrics == dataclasses.replace(last, num_running=0, num_waiting=0, kv_pages_used=0,
                                                  kv_pages_cached=0)


@pytest.mark.parametrize("message", [b"not a pickle", None])
def test_a_message_the_reader_cannot_read_or_handle_marks_the_engine_dead(message):
    """A message from the engine process that does not unpickle, or outputs whose handling raises, ended the reader
    thread silently: /health stayed 200 (the process lives on) and every request waited for good. Now the engine is
    dead, named, its requests failed and its gauges zero, as when the process exits."""
    import pickle
    import types

    from jaxdyn.engine.metrics import EngineMetrics

    class Conn:
        def recv_bytes(self):
            return message if message is not None else pickle.dumps(("outputs", ["bad"], None))

    pe = ProcessEngine.__new__(ProcessEngine)
    pe._conn, pe._closing, pe.dead = Conn(), False, None
    pe._proc = types.SimpleNamespace(join=lambda t: None, exitcode=None)
    pe.core = types.SimpleNamespace(metrics=EngineMetrics(num_running=2, kv_pages_used=5))
    failed = []
    pe._fail_all = lambda err, pending: failed.append(err)
    pe._handle = lambda items, pending: (_ for _ in ()).throw(TypeError("an item of another shape"))
    pe._read_loop()
    assert failed and pe.dead is failed[0]
    assert ("could not be read" if message else "could not be handled") in str(pe.dead)
    assert (pe.core.metrics.num_running, pe.core.metrics.kv_pages_used) == (0, 0)


def test_a_shutdown_ends_the_streams_in_flight_and_refuses_later_requests(ckpt):  # noqa: F811
    """ProcessEngine.shutdown with streams open left them waiting for good, and a request added after was taken and
    never answered (AsyncEngine's ends them with ShutdownError): now the same."""
    from jaxdyn.engine.async_engine import ShutdownError
    eng = ProcessEngine(ckpt, dtype="float32", config=CFG)

    async def run():
        sp = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
        outcomes = []

        async def consume(rid):
            try:
                async for _ in eng.generate([256, 5, 6, 7], sp, rid):
                    pass
                outcomes.append("finished")
            except ShutdownError as e:
                outcomes.append(str(e))
        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(2)]
        while eng.core.metrics.generation_tokens == 0:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert len(outcomes) == 2 and all(o in ("finished", "the engine was shut down") for o in outcomes), outcomes
        with pytest.raises(ShutdownError):
            eng.add_request([256, 5], SamplingParams(max_tokens=2), "late")
        assert not eng.is_healthy

    asyncio.run(run())


def test_an_engine_process_out_of_device_memory_says_what_to_change(monkeypatch):
    # the child's side of the pipe (``_engine_main``), its build running out of device memory
    import multiprocessing
    import pickle

    from jax.errors import JaxRuntimeError

    import jaxdyn.engine.llm as llm
    from jaxdyn.engine import process

    def oom(**build):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB\nmore")
    monkeypatch.setattr(llm, "build_engine", oom)
    parent, child = multiprocessing.Pipe()
    process._engine_main(child, {})
    kind, name, why = pickle.loads(parent.recv_bytes())
    assert (kind, name) == ("failed", "JaxRuntimeError")
    assert why.startswith("out of device memory while building the engine (RESOURCE_EXHAUSTED: Out of memory while "
                          "trying to allocate 4.00GiB): give the KV cache fewer pages (--num-pages)"), why
    # any other error as it is
    monkeypatch.setattr(llm, "build_engine", lambda **b: (_ for _ in ()).throw(JaxRuntimeError("INTERNAL: x")))
    process._engine_main(child, {})
    assert pickle.loads(parent.recv_bytes()) == ("failed", "JaxRuntimeError", "INTERNAL: x")
