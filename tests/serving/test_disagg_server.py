"""The OpenAI server over a disaggregated engine (prefill on devices 0-1, decode on 2-3): the same
greedy text as aggregated serving, streaming, the decisions in /metrics, a failed remote prefill as
an error event, and the --disagg command-line checks."""

import dataclasses
import json
import os
import subprocess
import sys

import httpx
import jax.numpy as jnp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineConfig, EngineCore
from jaxdyn.disagg.policy import DisaggPolicy
from jaxdyn.engine.llm import build_disagg_engine
from serving.app import ServerState
from tests.serving.test_server import TEMPLATE, Server
from tests.support import make_byte_tokenizer, make_hf_checkpoint

CFG = EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=32, max_num_seqs=8,
                   max_model_len=128, token_buckets=(8, 32), page_buckets=(8,), seed=0)
PROMPTS = ["a long prompt that goes to the prefill mesh, " * 2, "short", "x" * 70]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hf_checkpoint("qwen3", str(tmp_path_factory.mktemp("tiny-disagg")))
    make_byte_tokenizer(path, chat_template=TEMPLATE)
    return path


def _serve(engine):
    state = ServerState("tiny", max_queued_requests=64)
    state.engine = AsyncEngine(engine)
    return Server(state)


def _completions(url, stream):
    texts = []
    for prompt in PROMPTS:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if not stream:
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            continue
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        texts.append("".join(c["choices"][0]["text"] for c in chunks))
    return texts


@pytest.fixture(scope="module")
def reference(ckpt):
    mesh, loaded, tok = load_model(ckpt, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok, CFG)
    srv = _serve(core)
    try:
        yield _completions(srv.url, stream=False)
    finally:
        srv.stop()
        srv.state.engine.shutdown()


def test_disaggregated_server_answers_as_the_aggregated_one(ckpt, reference):
    eng = build_disagg_engine(ckpt, prefill_devices=[0, 1], decode_devices=[2, 3], dtype=jnp.float32,
                              config=CFG, policy=DisaggPolicy(min_remote_tokens=16))
    srv = _serve(eng)
    try:
        assert _completions(srv.url, stream=True) == reference
        assert _completions(srv.url, stream=False) == reference
        text = httpx.get(srv.url + "/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        decisions = {s.labels["decision"]: s.value for s in fams["jaxdyn:disagg_prefill_decisions"].samples
                     if s.name.endswith("_total")}
        assert decisions["remote"] >= 2 and decisions["short_prompt"] == 2, decisions
        transfers = [s.value for s in fams["jaxdyn:kv_transfers"].samples if s.name.endswith("_total")]
        assert transfers[0] >= 2
        assert eng.decode.allocator.num_in_use == 0 and not eng.decode.scheduler.reserved
        # the prefill mesh's engine, read when /metrics is: nothing held or queued once every request is done,
        # the remote prompts' pages kept by its prefix cache
        prefill = {n[len("jaxdyn:prefill_role_"):]: fams[n].samples[0].value for n in fams
                   if n.startswith("jaxdyn:prefill_role_")}
        assert prefill == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_pages_used": 0,
                           "prefix_cache_pages": eng.prefill.allocator.num_cache_only,
                           "kv_cache_pages_total": eng.prefill.allocator.num_pages}, prefill
        assert prefill["prefix_cache_pages"] > 0 and prefill["kv_cache_pages_total"] > 0
        assert eng.prefill_gauges()["kv_pages_used"] == 0
    finally:
        srv.stop()
        srv.state.engine.shutdown()


def test_a_failed_remote_prefill_is_an_error_event_then_done(ckpt):
    eng = build_disagg_engine(ckpt, prefill_devices=[4, 5], decode_devices=[6, 7], dtype=jnp.float32,
                              config=CFG, warmup=False,
                              policy=DisaggPolicy(min_remote_tokens=16, prefill_timeout_s=1e-6))
    srv = _serve(eng)
    try:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["code"] == "request_failed" and "did not finish" in err["message"]
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed"
        # the server lives on: a short prompt is prefilled locally and answered
        r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "hi", "stream": False}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
        srv.state.engine.shutdown()


@pytest.mark.parametrize("flags, message", [
    (["--disagg", "--decode-devices", "1"], "--prefill-devices: required"),
    (["--disagg", "--prefill-devices", "0,1", "--decode-devices", "1,2"], "overlap"),
    (["--disagg", "--prefill-devices", "0", "--decode-devices", "x"], "--decode-devices: expected"),
    (["--disagg", "--prefill-devices", "0", "--decode-devices", "99"], "device(s)"),
    (["--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--tp", "2"], "--tp does not apply"),
])
def test_disagg_flags_are_checked_before_loading(ckpt, flags, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--model", ckpt, *flags],
                       capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        DisaggPolicy(min_remote_tokens=-1)
    assert dataclasses.replace(DisaggPolicy(), max_prefill_queue=0).decide(
        prompt_len=500, decode_cached=0, prefill_queue=0, n=1, prefill_alive=True) == "prefill_queue"
