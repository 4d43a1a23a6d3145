"""Worker processes over gRPC on localhost: a prefill worker, decode workers that take KV from it
by gRPC stream and by jax.experimental.transfer, and the OpenAI frontend over them. The same
greedy text as one aggregated engine; a prompt whose prefill worker stops answering or is killed before it
answered is computed on the decode worker, with no leaked page; a prefill worker of another KV layout is skipped; a decode worker that stops answering is noticed and its requests fail while
the others go on; a client that leaves aborts the request on the worker."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import jax.numpy as jnp
import pytest

from checkpoints.loader import load_model, model_config_and_tokenizer
from jaxdyn import AsyncEngine, EngineConfig, EngineCore
from serving.app import ServerState
from serving.workers import worker_pb2 as pb
from serving.workers import worker_pb2_grpc as pb_grpc
from serving.workers.frontend import RemoteEngine
from tests.serving.test_server import TEMPLATE, Server
from tests.support import make_byte_tokenizer, make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4",
                "--max-num-batched-tokens", "32", "--num-pages", "64", "--token-buckets", "8,32",
                "--page-buckets", "8", "--seed", "0", "--log-level", "warning"]
PROMPTS = ["a long prompt for the prefill worker, and then some", "hi", "z" * 60]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("tiny-workers")))
    make_byte_tokenizer(path, chat_template=TEMPLATE)
    return path


class Worker:
    def __init__(self, ckpt, role, *extra, devices=2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        flags = [a for a in ENGINE_FLAGS if a != "--log-level" and a != "warning"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "worker", "--role", role, "--model", ckpt, "--port", "0",
             "--devices", ",".join(map(str, range(devices))), *flags, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._ready.set()

    def wait(self, timeout=300):
        if not self._ready.wait(timeout):
            raise AssertionError("worker never listened:\n" + "".join(self.lines[-30:]))
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def health(self):
        with grpc.insecure_channel(self.address) as ch:
            return pb_grpc.WorkerStub(ch).Health(pb.HealthRequest(), timeout=5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def reference(ckpt):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    cfg = EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=32, max_num_seqs=4,
                       max_model_len=128, token_buckets=(8, 32), page_buckets=(8,), seed=0)
    state = ServerState("tiny")
    state.engine = AsyncEngine(EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg))
    srv = Server(state)
    try:
        yield [_complete(srv.url, p) for p in PROMPTS]
    finally:
        srv.stop()
        state.engine.shutdown()


def _complete(url, prompt, max_tokens=10):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _stream_events(url, prompt, max_tokens=10, timeout=120):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        return [json.loads(e[6:]) if e != "data: [DONE]" else e
                for e in r.read().decode().split("\n\n") if e]


def _frontend(ckpt, addresses):
    cfg, tok = model_config_and_tokenizer(ckpt)
    state = ServerState("tiny")
    state.engine = RemoteEngine(addresses, tokenizer=tok, model_config=cfg, health_interval=0.3)
    # the engine starts once one worker answers; the tests route among all of theirs (a loaded host can answer one
    # worker's first health check late, and requests meanwhile all go to the other)
    deadline = time.monotonic() + 60
    while not all(w.healthy for w in state.engine.workers):
        assert time.monotonic() < deadline, state.engine._worker_states()
        time.sleep(0.05)
    return Server(state)


@pytest.fixture(scope="module")
def cluster(ckpt):
    """A prefill worker (TP 2), a decode worker taking KV by gRPC (TP 2) and one by
    jax.experimental.transfer (TP 1), each its own process."""
    pre = Worker(ckpt, "prefill").wait()
    dec_grpc = Worker(ckpt, "decode", "--prefill-workers", pre.address, "--kv-transport", "grpc",
                      "--disagg-min-remote-tokens", "16", "--disagg-prefill-timeout", "60")
    dec_jax = Worker(ckpt, "decode", "--prefill-workers", pre.address, "--kv-transport", "jax",
                     "--disagg-min-remote-tokens", "16", devices=1)
    procs = [pre, dec_grpc.wait(), dec_jax.wait()]
    yield pre, dec_grpc, dec_jax
    for p in procs:
        p.stop()


@pytest.mark.parametrize("which", ["grpc", "jax"])
def test_frontend_over_workers_answers_as_one_engine(cluster, ckpt, reference, which):
    pre, dec_grpc, dec_jax = cluster
    dec = dec_grpc if which == "grpc" else dec_jax
    srv = _frontend(ckpt, [dec.address])
    try:
        assert [_complete(srv.url, p) for p in PROMPTS] == reference
        events = _stream_events(srv.url, PROMPTS[0])
        assert events[-1] == "data: [DONE]" and all("error" not in e for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference[0]
        h = dec.health()
        assert h.role == "decode" and h.healthy and h.kv_pages_used == 0
        assert pre.health().kv_pages_used == 0
    finally:
        srv.stop()
        srv.state.engine.shutdown()


def test_a_client_that_leaves_aborts_on_the_worker(cluster, ckpt):
    _, dec, _ = cluster
    srv = _frontend(ckpt, [dec.address])
    try:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 70, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                break                       # one event, then hang up
        for _ in range(100):
            h = dec.health()
            if h.num_running == 0 and h.kv_pages_used == 0:
                break
            time.sleep(0.1)
        assert h.num_running == 0 and h.kv_pages_used == 0
        assert srv.state.engine.core.metrics.requests_finished.get("abort", 0) == 1
    finally:
        srv.stop()
        srv.state.engine.shutdown()


def test_the_frontends_gauges_follow_its_requests_and_the_workers_pages(cluster, ckpt):
    """/metrics of a frontend over workers: its requests in flight, and the decode workers' pages, gauges and
    counters from their Health replies (before: 0 running until a stream ended, no pages at all; the workers'
    counters left out). The prefill worker is stopped
    (SIGSTOP) so that a request stays in flight, its pages reserved on the decode worker."""
    pre, dec, _ = cluster
    srv = _frontend(ckpt, [dec.address])
    engine = srv.state.engine
    # a prompt no other test sends: the decode worker's prefix cache would otherwise keep it local
    body = {"model": "tiny", "prompt": "the gauges' own prompt, long enough to go to the prefill worker",
            "max_tokens": 8, "ignore_eos": True}
    pre.proc.send_signal(signal.SIGSTOP)
    try:
        t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", json=body, timeout=60),
                             daemon=True)
        t.start()
        for _ in range(100):
            if dec.health().kv_pages_used > 0:
                break
            time.sleep(0.05)
        engine._check_health()                           # what the health thread does every 0.3 s
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        gauges = {g.group(1): float(g.group(2)) for g in re.finditer(r"^(jaxdyn:\w+)\{[^}]*\} (\S+)$", text, re.M)}
        assert gauges["jaxdyn:num_requests_running"] == 1
        assert gauges["jaxdyn:kv_cache_pages_used"] == dec.health().kv_pages_used > 0
        assert gauges["jaxdyn:kv_cache_pages_total"] == dec.health().kv_pages_total > 0
        # the decode worker's own gauges, from its Health reply: the remote prefill it waits on
        assert gauges["jaxdyn:num_remote_prefills"] == json.loads(dec.health().metrics_json)["num_remote_prefills"] == 1
        assert "jaxdyn:time_to_first_token_seconds" in text and "jaxdyn:prompt_tokens" in text
        pre.proc.send_signal(signal.SIGCONT)
        t.join(timeout=60)
        assert engine.core.metrics.num_running == 0
        # and its counters once the request is done (they were left out of the front end's /metrics)
        engine._check_health()
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        values = {g.group(1): float(g.group(2)) for g in re.finditer(r"^(jaxdyn:[^ ]+) (\S+)$", text, re.M)}
        report = json.loads(dec.health().metrics_json)
        assert values['jaxdyn:engine_steps_total{model_name="tiny"}'] == report["steps"] > 0
        assert values['jaxdyn:kv_transfers_total{model_name="tiny"}'] == report["kv_transfers"] >= 1
        assert values['jaxdyn:disagg_prefill_decisions_total{decision="remote",model_name="tiny"}'] \
            == report["prefill_decisions"]["remote"] >= 1
        assert values['jaxdyn:kv_handoff_seconds_count{model_name="tiny"}'] == report["kv_handoff"]["count"] >= 1
        assert values['jaxdyn:num_remote_prefills{model_name="tiny"}'] == 0
    finally:
        pre.proc.send_signal(signal.SIGCONT)
        srv.stop()
        engine.shutdown()


def test_a_frontend_exports_the_prefill_workers_behind_its_decode_workers_once(cluster, ckpt):
    """/metrics of a front end over two decode workers that share one prefill worker: the ``prefill_role`` gauges
    are that prefill worker's pool and queues, counted once (before: nothing of the prefill workers was exported)."""
    pre, dec_grpc, dec_jax = cluster
    srv = _frontend(ckpt, [dec_grpc.address, dec_jax.address])
    engine = srv.state.engine
    names = {"num_requests_running": "num_running", "num_requests_waiting": "num_waiting",
             "kv_cache_pages_used": "kv_pages_used", "kv_cache_pages_total": "kv_pages_total"}
    try:
        gauges, want = {}, {}
        # each decode worker reads its prefill workers' Health once a second: until the gauges show what the
        # prefill worker says now (an earlier test's request may still be in a report of a second ago)
        deadline = time.monotonic() + 20
        while not want or any(gauges.get(f"jaxdyn:prefill_role_{n}") != want[f] for n, f in names.items()):
            assert time.monotonic() < deadline, (gauges, want)
            time.sleep(0.2)
            engine._check_health()
            text = httpx.get(srv.url + "/metrics", timeout=10).text
            gauges = {g.group(1): float(g.group(2))
                      for g in re.finditer(r"^(jaxdyn:prefill_role_\w+)\{[^}]*\} (\S+)$", text, re.M)}
            reply = pre.health()
            want = {f: getattr(reply, f) for f in names.values()}
        assert want["kv_pages_total"] > 0          # counted once: two decode workers report it
        assert "jaxdyn:prefill_role_prefix_cache_pages" in gauges
        workers = {g.group(1): float(g.group(2))
                   for g in re.finditer(r'^jaxdyn:workers\{[^}]*role="(\w+)"[^}]*\} (\S+)$', text, re.M)}
        assert workers == {"both": 0, "decode": 2, "prefill": 1}
        reports = [json.loads(d.health().metrics_json)["prefill_workers"] for d in (dec_grpc, dec_jax)]
        assert [len(r) for r in reports] == [1, 1] and reports[0][0]["instance"] == reports[1][0]["instance"]
        assert "prefill_workers" not in json.loads(reply.metrics_json)
    finally:
        srv.stop()
        engine.shutdown()


def test_prefill_worker_reports_are_summed_once_each_and_dropped_when_their_worker_stops_answering(monkeypatch):
    """The sums count each prefill worker process once (its ``instance``) and leave out values of another shape; a
    front end whose decode workers have no prefill workers exports none; a decode worker's report of a prefill
    worker goes once it has missed its Health checks."""
    import types

    from serving.workers import common, frontend, remote_prefill

    a = dict(num_running=2, num_waiting=1, kv_pages_used=5, kv_pages_cached=3, kv_pages_total=100, instance="a")
    b = dict(num_running=1, num_waiting=0, kv_pages_used=1, kv_pages_cached=0, kv_pages_total=50, instance="b")
    odd = dict(num_running="3", num_waiting=-1, kv_pages_used=True, kv_pages_cached=None, kv_pages_total=7,
               instance="c")
    huge = dict(b, instance="d", kv_pages_total=10 ** 400)   # past a float's range: it broke /metrics' rendering
    assert common.sum_prefill_reports([a, b, dict(a), odd, "x", huge]) == dict(
        num_running=4, num_waiting=1, kv_pages_used=7, kv_pages_cached=3, kv_pages_total=157)
    nested = types.SimpleNamespace(healthy=True, num_running=1, num_waiting=0, kv_pages_used=0, kv_pages_total=4,
                                   metrics_json="[" * 100000 + "]" * 100000)
    assert common.prefill_worker_report("h:1", nested) == dict(num_running=1, num_waiting=0, kv_pages_used=0,
                                                               kv_pages_cached=0, kv_pages_total=4, instance="h:1")
    w = frontend._Worker("127.0.0.1:9")
    w.take_report(nested.metrics_json)                  # a RecursionError had ended the front end's health thread
    assert w.report == {}

    engine = frontend.RemoteEngine.__new__(frontend.RemoteEngine)
    d1, d2, both = frontend._Worker("127.0.0.1:1"), frontend._Worker("127.0.0.1:2"), frontend._Worker("127.0.0.1:3")
    for w, role in ((d1, "decode"), (d2, "decode"), (both, "both")):
        w.role, w.healthy = role, True
    engine.workers = [both]
    both.report = {"steps": 3}
    assert engine.prefill_gauges() is None
    engine.workers = [d1, d2, both]
    d1.report, d2.report = {"prefill_workers": [a]}, {"prefill_workers": [a, b]}
    assert engine.prefill_gauges()["kv_pages_total"] == 150
    assert engine.worker_counts() == {"decode": 2, "both": 1, "prefill": 2}
    d2.healthy = False
    assert engine.prefill_gauges()["kv_pages_total"] == 100
    assert engine.worker_counts() == {"decode": 1, "both": 1, "prefill": 1}
    both.report = {"prefill_workers": {"x": 1}}         # of another shape: counted as none
    assert engine.worker_counts()["prefill"] == 1
    d1.report = {"prefill_workers": []}                 # its prefill workers all unreachable: zeros, not none
    assert engine.prefill_gauges() == dict.fromkeys(common.PREFILL_GAUGE_KEYS, 0)

    replies = [types.SimpleNamespace(healthy=True, num_running=1, num_waiting=2, kv_pages_used=3, kv_pages_total=9,
                                     metrics_json=json.dumps({"kv_pages_cached": 4, "instance": "p"}))]
    odd_replies = [types.SimpleNamespace(healthy=True, metrics_json=""),       # fields missing: nothing read
                   nested]                                                      # nested: read without its report

    class Stub:
        def Health(self, request, timeout):
            if odd_replies:
                return odd_replies.pop(0)
            if not replies:
                raise grpc.RpcError()
            return replies[0]

    monkeypatch.setattr(remote_prefill, "HEALTH_INTERVAL_S", 0.02)
    role = remote_prefill.RemotePrefillRole(["127.0.0.1:1"], timeout_s=10)
    try:
        role._stubs = [Stub()]
        deadline = time.monotonic() + 10
        while [r["instance"] for r in role.worker_reports()] != ["p"]:     # after the odd replies
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert role.worker_reports() == [dict(num_running=1, num_waiting=2, kv_pages_used=3, kv_pages_cached=4,
                                              kv_pages_total=9, instance="p")]
        assert not odd_replies and role._health.is_alive()
        replies.clear()
        while role.worker_reports():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        role.shutdown()


def test_a_frontend_over_no_decode_worker_says_so_at_once(cluster, ckpt):
    """--workers given only a prefill worker: refused as soon as it answers (it had waited out the 120 s connect
    timeout); a worker nobody answers at is named as unreachable when the timeout ends."""
    import socket
    pre, _, _ = cluster
    cfg, tok = model_config_and_tokenizer(ckpt)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"{pre.address} is a prefill worker: --workers takes decode or both"):
        RemoteEngine([pre.address], tokenizer=tok, model_config=cfg)
    assert time.monotonic() - t0 < 10
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"within 1 s: {nobody} unreachable, {pre.address} prefill"):
        RemoteEngine([nobody, pre.address], tokenizer=tok, model_config=cfg, connect_timeout=1)


def test_a_worker_names_a_malformed_params_json(cluster):
    _, dec, _ = cluster
    with grpc.insecure_channel(dec.address) as ch:
        stub = pb_grpc.WorkerStub(ch)
        for bad, message in (("{bad", "not JSON"), ("[1, 2]", "a JSON object"), ('{"foo": 1}', "unknown sampling "
                             "parameters: foo"), ('{"max_tokens": "x"}', "must be an integer")):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(request_id="bad", prompt_ids=[3, 4, 5], params_json=bad)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            details = json.loads(e.value.details())
            assert message in details["message"], (bad, details)
            assert details["param"] == ("max_tokens" if "max_tokens" in bad else "params_json")


def test_an_unreachable_prefill_worker_sends_the_prompt_back_to_be_computed_here(caplog):
    """A Prefill call refused before any answer (nothing listens there): every worker tried, then ("local", ...)
    to the sink, not an error: the decode worker computes the prompt itself; each worker skipped is named in the
    log (an operator sees the prefills fall back here)."""
    import socket

    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.remote_prefill import RemotePrefillRole
    addresses = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            addresses.append(f"127.0.0.1:{sock.getsockname()[1]}")
    role = RemotePrefillRole(addresses, timeout_s=10)
    got = []
    role.set_sink(got.append)
    try:
        role.submit("u1", [3, 4, 5], SamplingParams(max_tokens=1, seed=0))
        for _ in range(200):
            if got:
                break
            time.sleep(0.05)
        assert len(got) == 1 and got[0][:2] == ("local", "u1") and "no prefill worker reachable" in got[0][2]
        assert role.dead is not None                          # both skipped for a while
        for a in addresses:
            assert f"prefill worker {a} is unreachable" in caplog.text
    finally:
        role.shutdown()


def test_a_prefill_worker_that_stops_or_dies_mid_request_loses_nothing_and_leaks_nothing(ckpt, reference):
    """Stopped (SIGSTOP) while it holds a prompt: the decode worker's health checks find it silent, cancel the call
    and compute the prompt itself -- the same text as one engine, in seconds rather than at the 60 s prefill
    timeout -- and the pages it had reserved for the KV are freed. Killed: later prompts are prefilled on the
    decode worker."""
    pre = Worker(ckpt, "prefill").wait()
    dec = Worker(ckpt, "decode", "--prefill-workers", pre.address, "--disagg-min-remote-tokens", "16",
                 "--disagg-prefill-timeout", "60", devices=1).wait()
    srv = _frontend(ckpt, [dec.address])
    try:
        pre.proc.send_signal(signal.SIGSTOP)          # the prompt will be stuck on the prefill side
        result = {}
        t = threading.Thread(target=lambda: result.update(events=_stream_events(srv.url, PROMPTS[0], timeout=60)))
        t0 = time.monotonic()
        t.start()
        time.sleep(1.0)
        assert dec.health().kv_pages_used > 0         # pages reserved for the KV on its way
        t.join(60)
        assert not t.is_alive() and time.monotonic() - t0 < 30
        events = result["events"]
        assert events[-1] == "data: [DONE]" and all("error" not in e for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference[0]
        assert dec.health().kv_pages_used == 0        # the reservation was freed
        pre.proc.kill()
        assert _complete(srv.url, PROMPTS[0]) == reference[0]     # prefilled on the decode worker
        assert "stopped answering" in "".join(dec.lines)
    finally:
        srv.stop()
        srv.state.engine.shutdown()
        pre.stop()
        dec.stop()


def test_a_worker_that_stops_answering_fails_its_requests_and_new_ones_go_to_the_others(ckpt):
    a = Worker(ckpt, "both", devices=1)
    b = Worker(ckpt, "both", devices=1)
    a.wait(), b.wait()
    srv = _frontend(ckpt, [a.address, b.address])
    try:
        body = {"model": "tiny", "prompt": "x" * 20, "max_tokens": 100, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)                                # in flight on one worker: the next request goes to the other
            # the worker the front end sends the next request to (the fewest in flight, as RemoteEngine.add_request
            # picks: on a loaded host the first request may already have ended, and the next then goes to a)
            eng = srv.state.engine
            target = min(eng._live(), key=lambda w: len(w.inflight)).address
            b, a = (a, b) if target == a.address else (b, a)
            # stopped only now, just before that request: stopped earlier, a loaded host can take longer than the
            # frontend's health checks to get the first line, and the request then went to the other worker
            b.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            events = _stream_events(srv.url, "x" * 20, 20, 60)
            assert time.monotonic() - t0 < 30
            assert events[-1] == "data: [DONE]" and "unreachable" in events[-2]["error"]["message"]
            done = srv.state.engine.core.metrics.requests_finished      # a failure, not a client's abort
            assert done.get("error", 0) == 1 and done.get("abort", 0) == 0
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and "error" not in rest[-2]
        b.proc.kill()
        for _ in range(5):                             # every new request goes to the survivor
            assert _complete(srv.url, "y" * 10)
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
        srv.state.engine.shutdown()
        a.stop()
        b.stop()


def test_a_dead_worker_is_marked_down_at_its_first_unanswered_request_and_that_request_goes_elsewhere(ckpt):
    """A decode worker that died, until its health checks had failed, took most new requests (it had none in flight)
    and each failed with a 500 though nothing was computed and another worker was up. The first request it cannot
    answer marks it down and goes to the other worker; every request succeeds."""
    from concurrent import futures
    cfg, _ = model_config_and_tokenizer(ckpt)

    class Fake(pb_grpc.WorkerServicer):
        def Health(self, request, context):
            return pb.HealthReply(healthy=True, role="decode", model="tiny", max_model_len=1000, max_num_seqs=8,
                                  vocab_size=cfg.vocab_size)

        def Generate(self, request, context):
            yield pb.GenerateResponse(outputs=[pb.Completion(index=0, delta_token_ids=[65], delta_text="A",
                                                             finish_reason="length")], finished=True)

    servers = []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_WorkerServicer_to_server(Fake(), server)
        servers.append((server, server.add_insecure_port("127.0.0.1:0")))
        server.start()
    srv = _frontend(ckpt, [f"127.0.0.1:{port}" for _, port in servers])
    eng = srv.state.engine
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=30).status_code == 200
        servers[0][0].stop(0).wait()
        codes = [httpx.post(srv.url + "/v1/completions", json=body, timeout=30).status_code for _ in range(10)]
        assert codes == [200] * 10
        assert [w.healthy for w in eng.workers] == [False, True]
        assert not eng._streams and not any(w.inflight for w in eng.workers)
        assert eng.core.metrics.requests_finished.get("error", 0) == 0
        servers[1][0].stop(0).wait()                   # no worker left: the request fails, nothing is kept
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code >= 500 and r.json()["error"]["message"]
        assert not eng._streams and not any(w.inflight for w in eng.workers)
    finally:
        srv.stop()
        eng.shutdown()
        for server, _ in servers:
            server.stop(0)


@contextlib.contextmanager
def _prefill_service(core):
    """``core`` as a prefill worker's gRPC service in this process (its port), stopped on leaving."""
    import asyncio

    from jaxdyn.disagg.engine import LocalPrefillRole
    from serving.workers.worker import WorkerService, serve_worker

    role = LocalPrefillRole(core, None)
    service = WorkerService("prefill", "tiny", prefill=role)
    ports, stop = [], None
    loop = asyncio.new_event_loop()

    def serve():
        nonlocal stop
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        loop.run_until_complete(serve_worker(service, "127.0.0.1", 0, ports.append, stop))
    threading.Thread(target=serve, daemon=True).start()
    for _ in range(100):
        if ports:
            break
        time.sleep(0.05)
    try:
        yield ports[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        role.shutdown()


def _prefill_core(ckpt, page_size=16, num_pages=64, max_model_len=128):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    pages = -(-(max_model_len or num_pages * page_size + 1) // page_size)      # a sequence of max_model_len's
    cfg = EngineConfig(num_pages=num_pages, page_size=page_size, max_num_batched_tokens=8, max_num_seqs=4,
                       max_model_len=max_model_len, token_buckets=(8,), page_buckets=(pages,), seed=0)
    return EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, cfg)


def test_a_cancelled_prefill_call_aborts_the_prefill_and_frees_its_pages(ckpt):
    """The prefill worker's side of a client abort: the decode side cancels its Prefill call
    (DisaggEngine.abort -> RemotePrefillRole.abort); the prefill stops mid-way, pages freed."""
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.common import params_to_json

    core = _prefill_core(ckpt)
    real_step = core.step

    def slow_step():                     # 8 tokens a step, 0.3 s each: a 60-token prompt takes ~2 s
        time.sleep(0.3)
        return real_step()
    core.step = slow_step
    with _prefill_service(core) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.WorkerStub(ch)
            params = SamplingParams(temperature=0.0, max_tokens=1, seed=0)
            call = stub.Prefill(pb.PrefillRequest(request_id="c1", prompt_ids=list(range(3, 63)),
                                                  params_json=params_to_json(params), kv_transport="grpc"))
            time.sleep(0.8)                                  # a few prefill chunks in
            assert core.allocator.num_in_use > 0
            call.cancel()
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        for _ in range(50):
            if core.metrics.requests_finished.get("abort") == 1 and not core.has_unfinished():
                break
            time.sleep(0.1)
        assert core.metrics.requests_finished.get("abort") == 1       # stopped mid-prefill, not finished
        assert core.allocator.num_in_use == 0 and not core.scheduler.held


def test_a_prefill_worker_of_another_kv_layout_is_skipped_before_it_computes_anything(ckpt):
    """A decode worker names its KV layout in each Prefill call: a prefill worker of another page size refuses it
    (FAILED_PRECONDITION, the difference and the flag named) before reserving a page, the decode side skips that
    worker and, with no other, computes the prompt itself ("local"), not an error per request. The same worker
    answers a call whose layout matches, and its Health reports its layout."""
    import socket

    from jaxdyn.disagg.engine import Handoff
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.common import kv_layout, layout_mismatch, params_to_json
    from serving.workers.remote_prefill import RemotePrefillRole

    core = _prefill_core(ckpt, page_size=8)
    here = kv_layout(core)
    assert (here.page_size, here.num_kv_heads, here.vocab_size) == (8, core.model_config.num_kv_heads,
                                                                     core.model_config.vocab_size)
    longer = pb.KVLayout()
    longer.CopyFrom(here)
    longer.max_model_len = 2 * here.max_model_len          # other page buckets: refused too
    assert layout_mismatch(here, longer) == (f"KV layout differs: max model len {here.max_model_len} here, "
                                             f"{longer.max_model_len} there (start both with the same "
                                             "--max-model-len)")
    assert layout_mismatch(here, here) is None
    decode_side = pb.KVLayout()
    decode_side.CopyFrom(here)
    decode_side.page_size = 16
    params = SamplingParams(temperature=0.0, max_tokens=1, seed=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    with _prefill_service(core) as port:
        addr = f"127.0.0.1:{port}"
        with grpc.insecure_channel(addr) as ch:
            stub = pb_grpc.WorkerStub(ch)
            assert stub.Health(pb.HealthRequest(), timeout=5).kv_layout == here
            call = stub.Prefill(pb.PrefillRequest(request_id="l1", prompt_ids=list(range(3, 30)),
                                                  params_json=params_to_json(params), kv_transport="grpc",
                                                  expect_kv=decode_side))
            with pytest.raises(grpc.RpcError) as e:
                next(call)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "page size 8 here, 16 there" in e.value.details() and "--page-size" in e.value.details()
        assert core.allocator.num_in_use == 0 and not core.has_unfinished() and not core.metrics.requests_finished

        role = RemotePrefillRole([addr, nobody], timeout_s=10, expect=decode_side)
        got = []
        role.set_sink(got.append)
        try:
            for rid in ("l2", "l3"):                      # the second is refused by nobody: both are skipped
                role.submit(rid, list(range(3, 30)), params)
                for _ in range(200):
                    if any(g[1] == rid for g in got):
                        break
                    time.sleep(0.05)
            assert [g[:2] for g in got] == [("local", "l2"), ("local", "l3")]
            assert "no compatible prefill worker" in got[0][2] and "page size 8 here, 16 there" in got[0][2]
            assert role.dead is not None and addr in role.incompatible
        finally:
            role.shutdown()

        role = RemotePrefillRole([addr], timeout_s=30, expect=here)   # the same layout: answered
        got = []
        role.set_sink(got.append)
        try:
            role.submit("l4", list(range(3, 30)), params)
            for _ in range(600):
                if got:
                    break
                time.sleep(0.05)
            assert len(got) == 1 and isinstance(got[0], Handoff) and got[0].block.shape[4] == 8
        finally:
            role.shutdown()
        for _ in range(50):
            if not core.has_unfinished():
                break
            time.sleep(0.1)
        assert core.allocator.num_in_use == 0


def test_a_prompt_a_prefill_worker_refuses_for_its_own_limits_is_computed_here(ckpt):
    """A prefill worker of the same layout but a KV pool too small for a prompt the decode worker accepted refuses
    it (INVALID_ARGUMENT, before computing): the decode side computes it ("local"), not an error for the client;
    the worker stays in use."""
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.common import kv_layout
    from serving.workers.remote_prefill import RemotePrefillRole

    # 64 tokens of KV: its context is lowered to 65 (an explicit 128 would be refused at start)
    core = _prefill_core(ckpt, num_pages=4, max_model_len=None)
    with _prefill_service(core) as port:
        role = RemotePrefillRole([f"127.0.0.1:{port}"], timeout_s=30, expect=kv_layout(core))
        got = []
        role.set_sink(got.append)
        try:
            role.submit("big", list(range(3, 103)), SamplingParams(temperature=0.0, max_tokens=1, seed=0))
            for _ in range(200):
                if got:
                    break
                time.sleep(0.05)
            assert len(got) == 1 and got[0][:2] == ("local", "big") and "refused it" in got[0][2], got
            assert role.dead is None
        finally:
            role.shutdown()
    assert core.allocator.num_in_use == 0


class _StalledTransferWorker(pb_grpc.WorkerServicer):
    """A prefill worker that answers a Prefill with a jax-transport header naming a transfer it never offers
    (as one stopped or killed between its header and the pull), and answers Health until ``silent`` is set."""

    def __init__(self, address):
        self.address = address
        self.silent = threading.Event()

    def Prefill(self, request, context):
        yield pb.PrefillReply(header=pb.PrefillHeader(
            first_token=5, shape=[2, 4], dtype="float32", transport="jax", nbytes=32,
            transfer_uuid=4242, transfer_address=self.address))

    def Health(self, request, context):
        if self.silent.is_set():
            time.sleep(5)                # past the health check's timeout
        return pb.HealthReply(role="prefill")


@contextlib.contextmanager
def _stalled_transfer_worker():
    from concurrent import futures

    import jax
    from jax.experimental import transfer
    offerer = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
    fake = _StalledTransferWorker(offerer.address())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_WorkerServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _first_delivery(got, within):
    t0 = time.monotonic()
    while not got and time.monotonic() - t0 < within:
        time.sleep(0.05)
    return got[0] if got else None, time.monotonic() - t0


@pytest.mark.parametrize("how", ["timeout", "silent"])
def test_a_kv_pull_that_never_arrives_costs_its_request_not_the_decode_engine(how):
    """``pull`` over the jax transport returns an array at once and its data later. A prefill worker that stops
    between its header and the transfer: its block never arrives. It must not reach the decode engine (whose step
    would wait on it forever, and every request with it): past the prefill timeout the request fails
    (``timeout``); a worker that stops answering its Health meanwhile has the prompt computed here (``silent``)."""
    from jaxdyn.disagg.engine import Handoff
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.remote_prefill import RemotePrefillRole

    with _stalled_transfer_worker() as (fake, address):
        role = RemotePrefillRole([address], transport="jax", timeout_s=3 if how == "timeout" else 60)
        got = []
        role.set_sink(got.append)
        try:
            role.submit("p1", [3, 4, 5], SamplingParams(max_tokens=1, seed=0))
            if how == "silent":
                time.sleep(0.5)
                fake.silent.set()
            item, took = _first_delivery(got, within=30)
            assert item is not None, "nothing delivered"
            handed_over = isinstance(item, Handoff)         # (an unready block's repr would wait for it)
            assert not handed_over, "a block that never arrives was handed to the engine"
            if how == "timeout":
                assert item[:2] == ("error", "p1") and "did not arrive within the 3 s" in item[2]
            else:
                assert item[:2] == ("local", "p1") and took < 20
            assert not role._calls and not role._pending
        finally:
            role.shutdown()


@contextlib.contextmanager
def _fake_prefill_worker(transfer_host="127.0.0.1", dies_at_check=None):
    """A WorkerService in prefill mode over a role that hands over a small block 50 ms after each prompt; yields
    a stub of its gRPC server. ``dies_at_check``: the role reads as dead from that read of ``dead`` on (and takes
    no prompt)."""
    import asyncio
    import types

    import jax
    import numpy as np

    from jaxdyn.disagg.engine import Handoff
    from serving.workers.worker import WorkerService, serve_worker

    dev = jax.devices()[0]

    class Role:
        core = types.SimpleNamespace(check_request=lambda ids, p: None,
                                     runner=types.SimpleNamespace(mesh=types.SimpleNamespace(devices=np.array([dev]))))
        checks = 0

        @property
        def dead(self):
            self.checks += 1
            return RuntimeError("gone") if dies_at_check is not None and self.checks >= dies_at_check else None

        def set_sink(self, sink):
            self.sink = sink

        def submit(self, rid, ids, params, priority, arrival):
            if dies_at_check is not None:
                return                    # a dead thread: nothing comes back
            block = jnp.full((2, 2, 1, 4, 16, 64), 1.0)
            threading.Timer(0.05, lambda: self.sink(Handoff(rid, block, 7, None, 0, time.monotonic()))).start()

        def abort(self, rid):
            pass

    svc = WorkerService("prefill", "tiny", prefill=Role(), transfer_host=transfer_host)
    ports, loop_stop = [], []

    def run():
        async def main():
            loop_stop.append((asyncio.get_running_loop(), asyncio.Event()))
            await serve_worker(svc, "127.0.0.1", 0, ready=ports.append, stop=loop_stop[0][1])
        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not ports and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert ports, "the worker did not start"
    try:
        yield pb_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{ports[0]}"))
    finally:
        loop, stop = loop_stop[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def _offer(stub, rid, timeout=1.5):
    """A jax-transport Prefill whose caller reads the header and leaves."""
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.common import params_to_json
    call = stub.Prefill(pb.PrefillRequest(request_id=rid, prompt_ids=[1, 2, 3], kv_transport="jax",
                                          params_json=params_to_json(SamplingParams(max_tokens=1))), timeout=timeout)
    header = next(call).header
    call.cancel()
    return header


def _arrives(header, within):
    import jax
    from jax.experimental import transfer
    dev = jax.devices()[0]
    mine = transfer.start_transfer_server(dev.client, "127.0.0.1:0", ["127.0.0.1:0"])
    spec = jax.ShapeDtypeStruct(tuple(header.shape), jnp.dtype(header.dtype),
                                sharding=jax.sharding.SingleDeviceSharding(dev))
    x = mine.connect(header.transfer_address).pull(header.transfer_uuid, [spec])[0]
    t = time.monotonic()
    while not x.is_ready() and time.monotonic() - t < within:
        time.sleep(0.01)
    return x.is_ready()


def test_a_block_offered_but_never_pulled_is_withdrawn_at_the_callers_deadline():
    """A prefill worker offers a block over the jax transport and answers with its header; a caller that never pulls
    it (it cancelled once the result was in, failed before its pull, or died) left the offer, and its copy of the
    block, in the transfer server for good. The offer now lasts until the call's deadline: pulled before it, the
    block arrives; pulled after it, nothing comes."""
    with _fake_prefill_worker() as stub:
        assert _arrives(_offer(stub, "soon"), within=10)      # pulled within the deadline: it comes
        late = _offer(stub, "late")
        time.sleep(2.5)                                       # past the call's 1.5 s deadline
        assert not _arrives(late, within=2), "an offer never pulled is still held after its caller's deadline"


def test_the_transfer_address_is_the_workers_host():
    """The header names the worker's own host and its transfer server's port: an IPv6 host bracketed (the server
    could not start: '::1:0' is no address) and a host by name kept (the server reports 0.0.0.0 for it, where a
    decode worker finds only itself); a worker bound to a wildcard refuses the jax transport as incompatible, before
    computing anything (the decode side then prefills elsewhere)."""
    with _fake_prefill_worker("localhost") as stub:
        header = _offer(stub, "name", timeout=10)
        assert re.fullmatch(r"localhost:\d+", header.transfer_address), header.transfer_address
        assert _arrives(header, within=10)
    with _fake_prefill_worker("::1") as stub:
        header = _offer(stub, "v6", timeout=10)
        assert re.fullmatch(r"\[::1\]:\d+", header.transfer_address), header.transfer_address
    from serving.workers.common import INCOMPATIBLE
    with _fake_prefill_worker("0.0.0.0") as stub:
        with pytest.raises(grpc.RpcError) as e:
            _offer(stub, "wild", timeout=10)
        assert e.value.code() == INCOMPATIBLE and "--kv-transport grpc" in e.value.details()


def test_a_prefill_engine_that_dies_as_a_call_arrives_fails_the_call_at_once():
    """The prefill thread dying between a call's first check of it and its waiter's registration: its last word
    went to the waiters there were, and the call waited out its deadline for a reply that never came. The second
    check fails it at once."""
    from serving.workers.common import DEAD
    with _fake_prefill_worker(dies_at_check=2) as stub:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            _offer(stub, "r", timeout=20)
        assert e.value.code() == DEAD and time.monotonic() - t0 < 10, e.value


def test_shutting_down_a_decode_worker_does_not_wait_for_a_stalled_pull():
    """A decode worker's exit waited for a jax-transport pull whose block never comes (its pool's threads are joined
    at exit), up to the prefill timeout: shut down, the wait ends at once and nothing is delivered."""
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.remote_prefill import RemotePrefillRole

    with _stalled_transfer_worker() as (fake, address):
        role = RemotePrefillRole([address], transport="jax", timeout_s=60)
        got = []
        role.set_sink(got.append)
        role.submit("p1", [3, 4, 5], SamplingParams(max_tokens=1, seed=0))
        t0 = time.monotonic()
        while "p1" not in role._calls and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        time.sleep(0.3)                                 # past its header: waiting for the block
        assert "p1" in role._calls and not got          # stalled, not failed at once
        role.shutdown()
        t0 = time.monotonic()
        role._pool.shutdown(wait=True)                  # what the interpreter's exit waits for
        assert time.monotonic() - t0 < 5
        # nothing delivered: no Handoff (a dataclass), no local-prefill fallback; at most the request's error
        assert all(isinstance(g, tuple) and g[0] == "error" for g in got), got


def test_sampling_params_cross_to_a_worker_whole():
    """A request's parameters as the decode side sends them to a prefill worker (JSON): logit_bias's integer
    keys survive (a JSON object's would come back as strings, and be refused), bad pairs are named."""
    from jaxdyn.engine.sampling_params import SamplingParams, SamplingParamsError
    from serving.workers.common import params_from_json, params_to_json

    p = SamplingParams(max_tokens=5, temperature=0.7, seed=2**40, stop=["x"], logit_bias={7: 2.5, 300: -100.0},
                       allowed_token_ids=[7, 9, 300], prompt_logprobs=3, cache_salt="t")
    assert params_from_json(params_to_json(p)) == p
    assert params_from_json(params_to_json(SamplingParams())) == SamplingParams()
    for bad in ('{"logit_bias": {"7": 1}}', '{"logit_bias": [[[1], 2]]}', '{"logit_bias": [[-1, 2]]}'):
        with pytest.raises(SamplingParamsError) as e:
            params_from_json(bad)
        assert e.value.param == "logit_bias", bad


def test_a_frontend_over_workers_refuses_what_its_workers_would_before_a_stream_starts():
    """Workers return no prompt logprobs (their replies carry the sampled tokens' only): the front end refuses a
    request that asks for them, naming the field (a 400), rather than answering without them. It also refuses what
    a worker's engine would refuse without its pages (``check_request_ids``: token ids past the vocabulary in
    stop_token_ids, logit_bias or allowed_token_ids, the room of the bans until min_tokens, min_tokens past the
    context): a streamed request the worker refused had been answered 200 and then an error event."""
    import types

    from jaxdyn.engine.core import MAX_BANNED, RequestError
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.frontend import FrontendCore

    cfg = types.SimpleNamespace(vocab_size=300, eos_token_ids=(2, 7, 999))
    core = FrontendCore(None, cfg, max_model_len=64, max_num_seqs=8)
    assert core.eos_token_ids == (2, 7)         # as an engine makes them: the vocabulary's only
    core.check_request([1, 2, 3], SamplingParams(max_tokens=2))
    core.check_request([1, 2, 3], SamplingParams(max_tokens=None, min_tokens=61))     # up to the context's end
    refused = [(SamplingParams(max_tokens=2, prompt_logprobs=0), "prompt_logprobs", "serve --workers"),
               (SamplingParams(max_tokens=2, stop_token_ids=[300]), "stop_token_ids", "[0, 300)"),
               (SamplingParams(max_tokens=2, logit_bias={300: 1.0}), "logit_bias", "[0, 300)"),
               (SamplingParams(max_tokens=2, allowed_token_ids=[5, 300]), "allowed_token_ids", "[0, 300)"),
               (SamplingParams(max_tokens=4, min_tokens=2, logit_bias={i: 1.0 for i in range(MAX_BANNED - 1)}),
                "logit_bias", "EOS and stop ids (2)"),
               (SamplingParams(max_tokens=None, min_tokens=62), "min_tokens", "exceeds the 61 tokens")]
    for params, param, words in refused:
        with pytest.raises(RequestError) as e:
            core.check_request([1, 2, 3], params)
        assert e.value.param == param and words in str(e.value), (param, str(e.value))


def test_a_worker_found_back_gets_fresh_request_channels():
    """A worker the health check finds back after it was lost (or sees for the first time) has its requests'
    asyncio channels made afresh: one that failed while the worker was down waits out gRPC's reconnect backoff,
    and every request on it was refused for seconds while /health said 200."""
    import asyncio
    import types

    from serving.workers import frontend

    w = frontend._Worker("127.0.0.1:1")

    async def stubs():
        a, b = w.stub(), w.stub()
        w.generation += 1
        c = w.stub()
        await asyncio.sleep(0)                      # the replaced channel's close runs
        return a, b, c

    a, b, c = asyncio.run(stubs())
    assert a is b and c is not a

    class Health:
        def __init__(self):
            self.up = True

        def Health(self, request, timeout):
            if not self.up:
                raise frontend.grpc.RpcError()
            return types.SimpleNamespace(role="decode", healthy=True, max_model_len=64, max_num_seqs=4,
                                         vocab_size=10, kv_pages_used=0, kv_pages_total=8, num_waiting=0,
                                         metrics_json="")

    w = frontend._Worker("127.0.0.1:1")
    w.health_stub = Health()
    eng = object.__new__(frontend.RemoteEngine)
    eng.workers, eng.health_interval, eng.max_missed = [w], 0.5, 2
    eng._check_health()
    assert w.healthy and w.generation == 1          # first seen
    eng._check_health()
    assert w.generation == 1                        # still there: the same channels
    w.health_stub.up = False
    eng._check_health()
    eng._check_health()
    assert not w.healthy
    w.health_stub.up = True
    eng._check_health()
    assert w.healthy and w.generation == 2          # back: fresh channels


def test_a_worker_back_after_a_while_answers_its_clients_channel_within_about_a_second():
    """The front end's and a decode worker's channels to a worker (``CLIENT_CHANNEL_OPTIONS``: the health checks',
    the requests', the remote prefills') answer within about a second of the worker listening again after 12 s
    down. With gRPC's default reconnect backoff (1 s growing by 1.6x, +-20 %, to 120 s) its attempts come at about
    9.3 and 15.8 s, so the next one after 12 s is 2.5-5 s away (12.3 s with 16 s down); a probe found a restarted
    worker used again only 30-40 s after it listened."""
    import socket
    from concurrent import futures

    from serving.workers import frontend, remote_prefill
    from serving.workers.common import CLIENT_CHANNEL_OPTIONS

    assert frontend.CLIENT_CHANNEL_OPTIONS is remote_prefill.CLIENT_CHANNEL_OPTIONS is CLIENT_CHANNEL_OPTIONS
    options = dict(CLIENT_CHANNEL_OPTIONS)
    assert options["grpc.initial_reconnect_backoff_ms"] <= 500 and options["grpc.max_reconnect_backoff_ms"] <= 1000
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_CHANNEL_OPTIONS)
    ping = channel.unary_unary("/probe.Probe/Ping", request_serializer=bytes, response_deserializer=bytes)
    end = time.monotonic() + 12
    while time.monotonic() < end:           # the worker down: each call fails, the channel backs off
        with pytest.raises(grpc.RpcError):
            ping(b"", timeout=0.5)
        time.sleep(0.2)
    handler = grpc.method_handlers_generic_handler(
        "probe.Probe", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong", bytes, bytes)})
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        t0 = time.monotonic()
        while True:
            try:
                assert ping(b"", timeout=0.5) == b"pong"
                break
            except grpc.RpcError:
                assert time.monotonic() - t0 < 20, "never answered"
                time.sleep(0.1)
        assert time.monotonic() - t0 < 2.5
    finally:
        server.stop(0)
        channel.close()


def test_metrics_export_the_fields_a_metrics_object_keeps():
    """An EngineMetrics that keeps some fields (``collected``: the front end over workers) exports those metrics
    only; one that keeps all exports every one (the engine's own)."""
    from prometheus_client import generate_latest

    from jaxdyn.engine.metrics import EngineMetrics
    from serving.metrics import make_registry
    full = generate_latest(make_registry(lambda: EngineMetrics(), "m")).decode()
    part = generate_latest(make_registry(lambda: EngineMetrics(collected=frozenset({"num_running", "ttft"})),
                                         "m")).decode()
    assert "jaxdyn:kv_transfers" in full and "jaxdyn:engine_steps" in full
    assert "jaxdyn:num_requests_running" in part and "jaxdyn:time_to_first_token_seconds" in part
    assert "jaxdyn:kv_transfers" not in part and "jaxdyn:engine_steps" not in part
    assert "jaxdyn:num_requests_waiting" not in part and "jaxdyn:request_success" not in part


def test_workers_reports_are_summed_counters_over_all_gauges_over_the_live():
    """The front end's sums of its workers' Health reports: counters, finish-like dicts and histograms over every
    worker's last report (a lost worker's counts stay: a counter does not fall), gauges over the live ones; a
    field of another shape (a worker of another version) is left out of its sum."""
    from jaxdyn.engine.metrics import EngineMetrics, set_worker_sums, worker_report
    a, b = EngineMetrics(steps=5, kv_transfers=2, prefill_decisions={"remote": 3}, num_remote_prefills=1),\
        EngineMetrics(steps=7, prefill_decisions={"remote": 1, "short prompt": 4}, num_remote_prefills=2,
                      kv_pages_cached=9)
    a.queue_time.observe(0.003)
    b.queue_time.observe(0.003)
    b.queue_time.observe(30.0)
    ra, rb = json.loads(json.dumps(worker_report(a))), json.loads(json.dumps(worker_report(b)))
    m = EngineMetrics()
    set_worker_sums(m, [ra, rb], [rb])
    assert (m.steps, m.kv_transfers, m.prefill_decisions) == (12, 2, {"remote": 4, "short prompt": 4})
    assert (m.num_remote_prefills, m.kv_pages_cached) == (2, 9)
    assert m.queue_time.count == 3 and m.queue_time.sum == 30.006
    assert m.queue_time.cumulative() == [(le, (2 if le >= 0.005 else 0) + (le == float("inf") or le >= 40.0))
                                         for le, _ in m.queue_time.cumulative()]
    rb["steps"], rb["queue_time"]["buckets"] = "7", [1.0]
    set_worker_sums(m, [ra, rb], [])
    assert (m.steps, m.queue_time.count, m.num_remote_prefills) == (5, 1, 0)
    rb["steps"] = 10 ** 400             # past a float's range: Prometheus' client could not render it
    set_worker_sums(m, [ra, rb], [])
    assert m.steps == 5


def test_a_restarted_or_odd_workers_reports_keep_the_counters_from_falling():
    """A worker restarted at the same address reports from 0 under a new ``instance``: its earlier process's last
    report stays summed, so the front end's counters do not fall (Prometheus would read a reset); a report whose
    values are of another shape (a worker of another version) is left out of the sums, and nothing of it stops the
    health checks."""
    import types

    from jaxdyn.engine.metrics import EngineMetrics, worker_report
    from serving.workers import frontend

    def report(instance, **fields):
        return json.dumps({**worker_report(EngineMetrics(**fields)), "instance": instance})

    w = frontend._Worker("127.0.0.1:1")
    engine = frontend.RemoteEngine.__new__(frontend.RemoteEngine)
    engine.workers, engine.health_interval, engine.max_missed = [w], 0.1, 2
    engine.core = types.SimpleNamespace(metrics=EngineMetrics(), num_pages=0)
    replies = iter([report("a", steps=40, kv_transfers=3), report("b", steps=2),
                    json.dumps({"instance": "c", "steps": "x", "queue_time": {"buckets": "no"},
                                "prefill_decisions": {"remote": "3"}}), ""])

    class Health:
        def Health(self, request, timeout):
            return types.SimpleNamespace(role="decode", healthy=True, max_model_len=64, max_num_seqs=4,
                                         vocab_size=10, kv_pages_used=0, kv_pages_total=8, num_waiting=0,
                                         metrics_json=next(replies))

    w.health_stub = Health()
    steps = []
    for _ in range(4):
        engine._check_health()
        m = engine.core.metrics
        steps.append((m.steps, m.kv_transfers, m.prefill_decisions))
    assert steps == [(40, 3, {}), (42, 3, {}), (42, 3, {}), (42, 3, {})]
    assert w.healthy


def test_a_worker_listens_on_an_ipv6_literal_and_names_an_address_it_cannot_bind(monkeypatch):
    """``--host ::1`` was passed to gRPC as "::1:PORT" (no brackets), and an address gRPC cannot bind raised its
    RuntimeError past the CLI (a traceback after the model had loaded): a bracketed address, and an OSError the
    CLI names."""
    import asyncio
    import socket

    from serving.workers import worker

    monkeypatch.setattr(worker.pb_grpc, "add_WorkerServicer_to_server", lambda service, server: None)

    async def listen(host):
        stop, ports = asyncio.Event(), []
        await asyncio.wait_for(worker.serve_worker(None, host, 0, ready=lambda p: (ports.append(p), stop.set()),
                                                   stop=stop), 30)
        return ports

    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
            ipv6 = True
        except OSError:
            ipv6 = False
        if ipv6:
            assert asyncio.run(listen("::1"))[0] > 0
    with pytest.raises(OSError, match="cannot listen on 300.1.1.1:0"):
        asyncio.run(listen("300.1.1.1"))


def test_a_prompt_that_cannot_be_added_aborts_the_ones_added_before_it():
    """A completion of several prompts adds each before streaming any: where a later one was refused (no worker
    left, say), the earlier ones' streams never ran, and a front end over workers kept their entries, counted in
    flight, for good (its 503 bound then refused everyone). They are aborted: a never-streamed entry goes at once."""
    import asyncio
    import types

    from jaxdyn.engine.async_engine import EngineDeadError
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.app import _add_requests
    from serving.workers.frontend import RemoteEngine

    eng = RemoteEngine.__new__(RemoteEngine)
    worker = types.SimpleNamespace(inflight={})
    eng._streams = {}
    eng.core = types.SimpleNamespace(metrics=types.SimpleNamespace(num_running=0, prompt_tokens=0))
    live = [[worker], [worker], []]                  # the third prompt finds no worker
    eng._live = lambda: live.pop(0)

    async def run():
        with pytest.raises(EngineDeadError, match="no worker is available"):
            _add_requests(eng, [[1], [2], [3]], SamplingParams(max_tokens=2), "cmpl-x", 0)
        return eng._streams, worker.inflight, eng.core.metrics.num_running

    streams, inflight, running = asyncio.run(run())
    assert streams == {} and inflight == {} and running == 0
