"""jaxdyn bench serve: timings, failures, goodput, arrivals and concurrency against a fake server with injected
delays; datasets; JSON, --compare and --plot; token counts against the real server on the demo model."""

import json
import math
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from checkpoints.loader import load_model
from jaxdyn import AsyncEngine, EngineConfig, EngineCore
from serving.app import ServerState, build_app

from serving.bench import datasets
from serving.bench.client import RequestRecord
from serving.bench.datasets import PromptSource
from serving.bench.metrics import meets_slos
from serving.bench.serve import arrival_times
from serving.cli import DEMO_MODEL, main
from tests.serving.fake_openai import FakeOpenAI, free_port

SMALL = ["--random-input-len", "8", "--disable-tqdm"]


def bench(tmp_path, url, *argv, name="run.json") -> dict:
    out = tmp_path / name
    assert main(["bench", "serve", "--url", url, "--out", str(out), *SMALL, *argv]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def demo_tokenizer():
    from jaxdyn.engine.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(DEMO_MODEL)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_reported_latencies_and_throughputs_match_the_injected_delays(tmp_path, endpoint):
    # Tokens 100 ms apart: a TTFT that counted the second token (or the chat stream's role chunk) is off by
    # 100 ms, while the slack left for a loaded 2-core CI machine is 90 ms on medians (all twelve requests
    # came 40 ms late at once on one CI run with 40 ms apart).
    ttft, itl, n_out = 0.2, 0.1, 4
    with FakeOpenAI(ttft=ttft, itl=itl) as fake:
        doc = bench(tmp_path, fake.url, "--endpoint", endpoint, "--num-prompts", "12",
                    "--random-output-len", str(n_out))
    s = doc["runs"][0]["summary"]
    reqs = doc["runs"][0]["requests"]
    assert s["completed"] == 12 and s["failed"] == 0
    e2e = ttft + (n_out - 1) * itl
    # never faster than injected; single requests may be late (a GC pause on a busy CI machine), medians may not
    for r in reqs:
        # the chat stream's opening role chunk comes at once and must not count as the first token
        assert ttft <= r["ttft"] < r["e2e"]
        # token k arrives no earlier than it was sent (ttft + k * itl); a late chunk shortens the interval after
        # it (one CI run: 87 ms after a chunk 13 ms late), so the arrivals are bounded, not each interval
        assert len(r["itls"]) == n_out - 1 and all(x > 0 for x in r["itls"])
        assert all(r["ttft"] + sum(r["itls"][:k]) >= ttft + k * itl - 0.005 for k in range(1, n_out))
        assert e2e <= r["e2e"]
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / (n_out - 1), abs=1e-5)
        assert r["output_tokens"] == n_out and r["token_source"] == "usage"
        assert r["prompt_len"] == 8 + 1 and r["prompt_token_source"] == "usage"    # the fake: words + 1
    assert 200 <= s["median_ttft_ms"] < 290 and s["median_ttft_ms"] <= s["p90_ttft_ms"] <= s["p99_ttft_ms"]
    # a chunk that arrives late shortens the next interval: intervals keep the per-request 5 ms slack above, and
    # so do their medians (one CI run: median ITL 99.76 ms with the machine busy)
    assert 95 <= s["median_itl_ms"] < 150 and 95 <= s["median_tpot_ms"] < 150
    assert 500 <= s["median_e2el_ms"] < 590
    # throughputs are the totals over the run's duration, which is about one request's latency
    assert s["total_output_tokens"] == 12 * n_out and s["total_input_tokens"] == 12 * 9
    assert e2e <= s["duration_s"] < 2 * e2e
    assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(12 * n_out / s["duration_s"])
    assert s["total_token_throughput"] == pytest.approx((12 * n_out + 108) / s["duration_s"])


def test_failed_requests_are_counted_with_their_errors(tmp_path):
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        fake.fail_every, fake.error_event_every = 5, 7
        # one at a time: the record of dataset index i is the fake's request i + 1
        doc = bench(tmp_path, fake.url, "--num-prompts", "20", "--random-output-len", "4", "--max-concurrency", "1")
    run = doc["runs"][0]
    s, reqs = run["summary"], run["requests"]
    failed = {i + 1 for i, r in enumerate(reqs) if not r["success"]}
    assert failed == {5, 10, 15, 20, 7, 14}
    assert s["completed"] == 14 and s["failed"] == 6 and s["total_output_tokens"] == 14 * 4
    assert reqs[4]["error"] == "HTTP 500: injected failure of request 5"
    assert reqs[6]["error"] == "error event: injected error event 7"
    assert len(s["errors"]) == 6 and s["errors"]["HTTP 500: injected failure of request 10"] == 1


def test_a_run_in_which_every_request_failed_exits_2_after_its_report(tmp_path):
    import contextlib
    import io
    err = io.StringIO()
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake, contextlib.redirect_stderr(err):
        fake.fail_every = 1
        out = str(tmp_path / "r.json")
        assert main(["bench", "serve", "--url", fake.url, "--num-prompts", "3", "--random-output-len", "4",
                     "--num-warmups", "0", "--out", out, *SMALL]) == 2
    assert "every request failed (first error: HTTP 500: injected failure of request" in err.getvalue()
    assert json.load(open(out))["runs"][0]["summary"]["failed"] == 3      # the report is still written


def test_a_request_past_the_timeout_fails_with_a_timeout_error(tmp_path, capsys):
    with FakeOpenAI(ttft=0.01, itl=0.01) as fake:
        fake.hang_every = 3
        doc = bench(tmp_path, fake.url, "--num-prompts", "3", "--random-output-len", "4", "--timeout", "0.5",
                    "--max-concurrency", "1")
    reqs = doc["runs"][0]["requests"]
    assert [r["success"] for r in reqs] == [True, True, False]
    assert reqs[2]["error"] == "timeout after 0.5 s"
    assert "1 failed: timeout after 0.5 s" in capsys.readouterr().out


def test_goodput_counts_the_requests_meeting_every_slo(tmp_path):
    # even-numbered requests take 300 ms to their first token, odd ones 20 ms
    with FakeOpenAI(ttft=lambda n: 0.3 if n % 2 == 0 else 0.02, itl=0.01) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "10", "--random-output-len", "4",
                    "--slo-ttft-ms", "150", "--slo-e2e-ms", "250")
    s, reqs = doc["runs"][0]["summary"], doc["runs"][0]["requests"]
    good = [r for r in reqs if r["ttft"] * 1000 <= 150 and r["e2e"] * 1000 <= 250]
    assert len(good) == 5 and s["good_requests"] == 5
    assert s["goodput"] == pytest.approx(5 / s["duration_s"])
    assert s["goodput"] < s["request_throughput"] == pytest.approx(10 / s["duration_s"])


def test_slo_arithmetic_of_one_request():
    r = RequestRecord(index=0, success=True, ttft=0.1, e2e=0.5, output_tokens=5)     # tpot 100 ms
    assert meets_slos(r, {"ttft": 100, "tpot": 100, "e2el": 500})
    assert not meets_slos(r, {"tpot": 99.9})
    assert not meets_slos(r, {"ttft": 99})
    one = RequestRecord(index=0, success=True, ttft=0.1, e2e=0.1, output_tokens=1)   # no TPOT: meets it
    assert one.tpot is None and meets_slos(one, {"tpot": 1})
    assert not meets_slos(RequestRecord(index=0, success=False), {"ttft": 1e9})


def test_poisson_and_gamma_arrivals_have_the_requested_mean_rate():
    rng = np.random.default_rng(0)
    t = arrival_times(4001, 20.0, 1.0, rng)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert 4000 / t[-1] == pytest.approx(20.0, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)        # exponential: CV 1
    bursty = np.diff(arrival_times(4001, 20.0, 0.25, np.random.default_rng(0)))
    assert 1 / bursty.mean() == pytest.approx(20.0, rel=0.1)
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, rel=0.15)   # gamma shape k: CV 1/sqrt(k)
    assert np.array_equal(t, arrival_times(4001, 20.0, 1.0, np.random.default_rng(0)))
    assert not np.array_equal(t, arrival_times(4001, 20.0, 1.0, np.random.default_rng(1)))
    assert not arrival_times(50, math.inf, 1.0, rng).any()


def test_requests_are_sent_at_their_scheduled_arrival_times(tmp_path):
    with FakeOpenAI(ttft=0.005, itl=0.001) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "30", "--random-output-len", "2", "--request-rate", "40",
                    "--seed", "3")
    want = arrival_times(30, 40.0, 1.0, datasets.seeded_rng(3, 1, 1))
    got = np.array([r["start"] for r in doc["runs"][0]["requests"]])
    _on_schedule(got, want)
    assert doc["runs"][0]["summary"]["duration_s"] >= want[-1]


def _on_schedule(got, want):
    """Sent at the scheduled times: none more than 30 ms early, most within 30 ms; a loaded 2-core host (CI beside
    other work) delays a few (one 91 ms late once), so those have a wider bound."""
    late = got - want
    assert np.all(late > -0.03) and np.median(np.abs(late)) < 0.03 and np.all(late < 0.25), late


def test_several_client_processes_keep_the_schedule_the_bound_and_the_conversations(tmp_path):
    """--num-clients: the requests spread over processes that share the arrival schedule and start time;
    --max-concurrency is divided among them; a conversation's turns stay in order in one process."""
    with FakeOpenAI(ttft=0.005, itl=0.001) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "30", "--random-output-len", "2", "--request-rate", "40",
                    "--seed", "3", "--num-clients", "3")
        assert fake.count == 30
    run = doc["runs"][0]
    assert doc["config"]["num_clients"] == 3 and run["summary"]["completed"] == 30
    assert [r["index"] for r in run["requests"]] == list(range(30))
    want = arrival_times(30, 40.0, 1.0, datasets.seeded_rng(3, 1, 1))
    got = np.array([r["start"] for r in run["requests"]])
    _on_schedule(got, want)
    with FakeOpenAI(ttft=0.05, itl=0.01) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "12", "--random-output-len", "3", "--max-concurrency", "4",
                    "--num-clients", "2")
        assert fake.peak <= 4 and doc["runs"][0]["summary"]["completed"] == 12
    for limit, clients in ((1, 4), (3, 2)):       # the bound is the run's, however few: shares that add up to it
        with FakeOpenAI(ttft=0.05, itl=0.01) as fake:
            doc = bench(tmp_path, fake.url, "--num-prompts", "12", "--random-output-len", "3", "--max-concurrency",
                        str(limit), "--num-clients", str(clients))
            assert fake.peak <= limit and doc["runs"][0]["summary"]["completed"] == 12, (limit, clients, fake.peak)
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        doc = bench(tmp_path, fake.url, "--dataset", "multiturn", "--num-prompts", "8", "--num-turns", "3",
                    "--turn-len", "4", "--output-len", "3", "--num-clients", "2")
    by_key = {(r["conversation"], r["turn"]): r for r in doc["runs"][0]["requests"]}
    assert len(by_key) == 8 and all(r["success"] for r in by_key.values())
    for (c, t), r in by_key.items():
        if t:
            prev = by_key[(c, t - 1)]
            assert r["start"] >= prev["start"] + prev["e2e"] - 1e-3 and r["prompt_len"] > prev["prompt_len"] + 3


def test_max_concurrency_is_never_exceeded(tmp_path):
    with FakeOpenAI(ttft=0.05, itl=0.01) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "12", "--random-output-len", "3", "--max-concurrency", "3")
        assert fake.peak == 3 and doc["runs"][0]["summary"]["peak_concurrency"] == 3
        assert doc["runs"][0]["summary"]["completed"] == 12
    with FakeOpenAI(ttft=0.05, itl=0.01) as fake:     # without the bound all 12 are in flight at once
        doc = bench(tmp_path, fake.url, "--num-prompts", "12", "--random-output-len", "3")
        assert fake.peak == 12 and doc["runs"][0]["summary"]["peak_concurrency"] == 12


def test_json_has_every_field(tmp_path):
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "4", "--random-output-len", "3", "--num-warmups", "2",
                    "--percentiles", "50,90,99.9", "--slo-tpot-ms", "100", "--request-rate", "1000,inf")
        assert fake.count == 2 + 4 + 4
    assert doc["benchmark"] == "jaxdyn bench serve" and doc["warmup"] == {"requests": 2, "failed": 0, "errors": []}
    assert doc["config"]["model"] == "fake" and doc["config"]["endpoint"] == "/v1/completions"
    assert doc["config"]["num_prompts"] == 4 and doc["config"]["seed"] == 0 and doc["config"]["ignore_eos"] is True
    assert [run["request_rate"] for run in doc["runs"]] == [1000.0, "inf"]
    s = doc["runs"][0]["summary"]
    for key in ["completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "peak_concurrency",
                "good_requests", "goodput", "errors", "token_sources"]:
        assert key in s, key
    for kind in ["ttft", "tpot", "itl", "e2el"]:
        for stat in ["mean", "median", "std", "p50", "p90", "p99.9"]:
            assert isinstance(s[f"{stat}_{kind}_ms"], float), (stat, kind)
    lines = (tmp_path / "run.json").read_text().splitlines()       # a request record per line
    assert sum(ln.lstrip().startswith('{"index": ') for ln in lines) == 8 and len(lines) < 150
    assert set(doc["runs"][0]["requests"][0]) == {
        "index", "prompt_len", "max_tokens", "output_tokens", "start", "ttft", "itls", "e2e", "tpot", "success", "error",
        "token_source", "prompt_token_source", "cached_tokens", "conversation", "turn"}


def test_sampling_flags_reach_each_request_body_and_defaults_send_none():
    from serving.bench.client import Endpoint
    body = Endpoint("http://x", "completions", "m", temperature=0.8, top_p=0.9, top_k=5).payload("hi", 4)
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.8, 0.9, 5)
    body = Endpoint("http://x", "chat", "m").payload([{"role": "user", "content": "hi"}], 4)
    assert body["temperature"] == 0.0 and "top_p" not in body and "top_k" not in body


def test_token_counts_fall_back_to_the_tokenizer_then_to_chunks(tmp_path, demo_tokenizer):
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        fake.usage = False
        doc = bench(tmp_path, fake.url, "--num-prompts", "3", "--random-output-len", "5", "--tokenizer", DEMO_MODEL)
        prompts = [b["prompt"] for b in fake.bodies]
        chunks = bench(tmp_path, fake.url, "--num-prompts", "3", "--random-output-len", "5", "--no-stream-usage")
        assert "stream_options" not in fake.bodies[-1]
    for r, prompt in zip(doc["runs"][0]["requests"], prompts):
        assert r["token_source"] == "tokenizer" and r["prompt_token_source"] == "tokenizer"
        assert r["prompt_len"] == len(demo_tokenizer.encode(prompt)) == 8        # exact length, BOS included
    n = doc["runs"][0]["requests"][0]["index"] + 1
    reply = "".join(f"t{n}.{k} " for k in range(5))
    assert doc["runs"][0]["requests"][0]["output_tokens"] == len(demo_tokenizer.encode(reply, add_special_tokens=False))
    for r in chunks["runs"][0]["requests"]:
        assert r["token_source"] == "chunks" and r["output_tokens"] == 5
        assert r["prompt_token_source"] == "estimate" and r["prompt_len"] == 8       # words


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_multiturn_conversations_resend_their_history_with_the_actual_replies(tmp_path, endpoint):
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        doc = bench(tmp_path, fake.url, "--endpoint", endpoint, "--dataset", "multiturn", "--num-prompts", "8",
                    "--num-turns", "3", "--turn-len", "4", "--output-len", "3")
        bodies = fake.bodies
    replies = ["".join(f"t{n}.{k} " for k in range(3)) for n in range(1, len(bodies) + 1)]
    reqs = doc["runs"][0]["requests"]
    assert len(reqs) == 8 and all(r["success"] for r in reqs)
    assert sorted((r["conversation"], r["turn"]) for r in reqs) == [(c, t) for c in range(3) for t in range(3)][:8]
    # every turn after the first extends the server's view of the previous turn by its reply and a new message
    followed = 0
    for n, body in enumerate(bodies):
        for m, later in enumerate(bodies):
            if endpoint == "chat":
                if later["messages"][:len(body["messages"])] == body["messages"] and \
                        len(later["messages"]) == len(body["messages"]) + 2:
                    assert later["messages"][-2] == {"role": "assistant", "content": replies[n]}
                    assert m > n
                    followed += 1
            elif later["prompt"].startswith(body["prompt"]) and \
                    later["prompt"].count("\n") == body["prompt"].count("\n") + 1:   # history joined by newlines
                assert later["prompt"].startswith(body["prompt"] + replies[n])
                followed += 1
    assert followed == 8 - 3             # one per turn after a conversation's first
    by_key = {(r["conversation"], r["turn"]): r for r in reqs}
    for (c, t), r in by_key.items():
        if t:
            prev = by_key[(c, t - 1)]
            assert r["start"] >= prev["start"] + prev["e2e"] - 1e-3
            assert r["prompt_len"] > prev["prompt_len"] + 3


def test_random_dataset_lengths_are_exact_with_a_tokenizer(demo_tokenizer):
    source = PromptSource(np.random.default_rng(0), demo_tokenizer)
    samples = datasets.random_samples(source, 40, 100, 20, range_ratio=0.5)
    lens = [len(demo_tokenizer.encode(s.prompt, add_special_tokens=False)) for s in samples]
    # the drawn length counts the BOS the server adds (vLLM's datasets: num_special_tokens_to_add); it came on top
    assert all(50 <= s.prompt_len <= 150 for s in samples) and len(set(lens)) > 10
    assert [s.prompt_len for s in samples] == [n + 1 for n in lens]                  # + BOS
    assert all(10 <= s.output_len <= 30 for s in samples)
    again = datasets.random_samples(PromptSource(np.random.default_rng(0), demo_tokenizer), 40, 100, 20, 0.5)
    assert [s.prompt for s in again] == [s.prompt for s in samples]


def test_prefix_dataset_shares_n_prefixes_with_distinct_suffixes():
    source = PromptSource(np.random.default_rng(0), vocab_size=1000)
    samples = datasets.prefix_samples(source, 24, num_prefixes=3, prefix_len=32, suffix_len=8, output_len=5)
    assert len(samples) == 24 and all(len(s.prompt) == 40 and s.prompt_len == 40 for s in samples)
    prefixes = [tuple(s.prompt[:32]) for s in samples]
    assert len(set(prefixes)) == 3 and all(prefixes.count(p) == 8 for p in set(prefixes))
    assert len({tuple(s.prompt[32:]) for s in samples}) == 24
    assert prefixes[:8] != [prefixes[0]] * 8                                           # shuffled


def test_sharegpt_file_gives_first_exchanges_filtered_as_vllm_does(tmp_path, demo_tokenizer):
    convs = [{"conversations": [{"from": "human", "value": f"Tell me, good sir, of thy {w} and why"},
                                {"from": "gpt", "value": "My lord, I shall speak of it anon, and truly."}]}
             for w in ("horse", "sword", "house", "king")]
    convs.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]})
    convs.append({"conversations": [{"from": "human", "value": "only one turn"}]})
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    source = PromptSource(np.random.default_rng(0), demo_tokenizer)
    samples = datasets.sharegpt_samples(source, str(path), 4, None)
    assert sorted(s.prompt for s in samples) == sorted(c["conversations"][0]["value"] for c in convs[:4])
    reply_len = len(demo_tokenizer.encode(convs[0]["conversations"][1]["value"], add_special_tokens=False))
    assert all(s.output_len == reply_len and s.prompt_len == len(demo_tokenizer.encode(s.prompt)) for s in samples)
    with pytest.raises(datasets.BenchError, match="only 4 usable conversations"):
        datasets.sharegpt_samples(source, str(path), 5, None)       # "Hi" is under 4 tokens
    with pytest.raises(datasets.BenchError, match="--tokenizer"):
        datasets.sharegpt_samples(PromptSource(np.random.default_rng(0)), str(path), 4, None)
    words = datasets.sharegpt_samples(PromptSource(np.random.default_rng(0)), str(path), 5, 7)
    assert all(s.output_len == 7 and s.prompt_len is None for s in words)
    # a fixed --output-len under 4 keeps the conversations (vLLM checks only measured replies; every one was dropped)
    short = datasets.sharegpt_samples(PromptSource(np.random.default_rng(0), demo_tokenizer), str(path), 4, 2)
    assert all(s.output_len == 2 for s in short)


@pytest.mark.parametrize("replies", datasets.SHAREGPT_REPLY_SHAPES)
def test_sharegpt_lengths_match_sharegpt_totals_and_vllm_filters(replies):
    p, o = datasets.sharegpt_lengths(np.random.default_rng(0), 1000, replies)
    assert (p.sum(), o.sum()) == (215196, 198343)          # vLLM's ShareGPT sample, Llama-3 tokenizer
    assert p.min() >= 4 and p.max() <= 1024 and o.min() >= 4 and (p + o).max() <= 2047
    assert 0.20 < (p <= 20).mean() < 0.30 and 0.78 < (p <= 500).mean() < 0.90   # the published prompt CDF
    assert np.median(o) < o.mean() / 1.1                    # a long tail of replies, not a fixed length
    p2, o2 = datasets.sharegpt_lengths(np.random.default_rng(1), 1000, replies)
    assert (p2.sum(), o2.sum()) == (215196, 198343) and not np.array_equal(p, p2)


def test_sharegpt_reply_shapes():
    """chatgpt: the artifact's shape (median / mean 280 / 348.4, p99 / median 4.6, longest 2,009 of mean 348.4)
    at the Llama-3 mean; lognormal sigma 1: p99 / median e^2.33 = 10, its longest reply near the 2,047 cap."""
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    _, o = datasets.sharegpt_lengths(rng(), 20000, "chatgpt")
    assert 0.74 < np.median(o) / o.mean() < 0.87
    assert 3.8 < np.percentile(o, 99) / np.median(o) < 5.4
    assert o.max() <= 2009 * 198.343 / 348.4 * 1.05
    _, lo = datasets.sharegpt_lengths(rng(), 20000, "lognormal")
    assert np.percentile(lo, 99) / np.median(lo) > 7 and lo.max() > 1.5 * o.max()
    p1, _ = datasets.sharegpt_lengths(rng(), 50, "chatgpt")
    p2, _ = datasets.sharegpt_lengths(rng(), 50, "lognormal")
    assert np.array_equal(p1, p2)                           # the shapes differ in the replies only
    with pytest.raises(datasets.BenchError, match="reply shape"):
        datasets.sharegpt_lengths(rng(), 10, "uniform")


def test_sharegpt_lengths_dataset_prompts_are_exact_with_a_tokenizer(demo_tokenizer):
    source = PromptSource(np.random.default_rng(0), demo_tokenizer)
    samples = datasets.sharegpt_length_samples(source, 30)
    p, o = datasets.sharegpt_lengths(np.random.default_rng(0), 30)
    assert [s.output_len for s in samples] == o.tolist()
    # the drawn lengths are the prompts' at the server, BOS included (vLLM's ShareGPT totals count it)
    assert [s.prompt_len for s in samples] == p.tolist()
    assert [len(demo_tokenizer.encode(s.prompt, add_special_tokens=False)) for s in samples] == (p - 1).tolist()
    ids = datasets.sharegpt_length_samples(PromptSource(np.random.default_rng(0), vocab_size=500), 30)
    assert [len(s.prompt) for s in ids] == p.tolist()


def test_sharegpt_lengths_run_against_the_fake_server(tmp_path):
    with FakeOpenAI(ttft=0.01, itl=0.001) as fake:
        doc = bench(tmp_path, fake.url, "--dataset", "sharegpt-lengths", "--num-prompts", "8")
        sent = sorted(b["max_tokens"] for b in fake.bodies)
    assert sent == sorted(datasets.sharegpt_lengths(datasets.seeded_rng(0, 1, 0), 8)[1].tolist())
    assert doc["runs"][0]["summary"]["completed"] == 8
    with FakeOpenAI(ttft=0.01, itl=0.001) as fake:
        bench(tmp_path, fake.url, "--dataset", "sharegpt-lengths", "--num-prompts", "8",
              "--sharegpt-replies", "lognormal")
        sent = sorted(b["max_tokens"] for b in fake.bodies)
    assert sent == sorted(datasets.sharegpt_lengths(datasets.seeded_rng(0, 1, 0), 8, "lognormal")[1].tolist())


def test_sharegpt_run_against_the_fake_server(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "a b c"}]}
             for i in range(6)]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        doc = bench(tmp_path, fake.url, "--dataset", "sharegpt", "--dataset-path", str(tmp_path / "sg.json"),
                    "--num-prompts", "6", "--output-len", "4", "--endpoint", "chat")
        assert sorted(b["messages"][0]["content"] for b in fake.bodies) == [f"question {i}" for i in range(6)]
    assert doc["runs"][0]["summary"]["completed"] == 6 and doc["runs"][0]["summary"]["total_output_tokens"] == 24


def _row(text: str, label: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_prints_both_runs_and_the_ratios_b_over_a(tmp_path, capsys):
    with FakeOpenAI(ttft=0.05, itl=0.01) as fake:
        bench(tmp_path, fake.url, "--num-prompts", "6", "--random-output-len", "4", name="a.json")
    with FakeOpenAI(ttft=0.15, itl=0.01) as fake:
        bench(tmp_path, fake.url, "--num-prompts", "6", "--random-output-len", "4", name="b.json")
    a, b = (json.loads((tmp_path / f).read_text())["runs"][0]["summary"] for f in ("a.json", "b.json"))
    capsys.readouterr()
    assert main(["bench", "serve", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    label, va, vb, ratio = _row(out, "Mean TTFT (ms)")
    assert float(va.replace(",", "")) == pytest.approx(a["mean_ttft_ms"], abs=0.01)
    assert float(ratio) == pytest.approx(b["mean_ttft_ms"] / a["mean_ttft_ms"], abs=1e-3)
    # the fakes' first tokens differ by 100 ms; what the loaded host adds to both is not a ratio's (CI: 2.15x), and
    # it may add more to one run than to the other (a busy 2-core host: 132 ms apart, or 78), so no upper bound and
    # a lower one well under the 100 ms
    assert b["mean_ttft_ms"] - a["mean_ttft_ms"] > 50 and float(ratio) > 1
    assert float(_row(out, "Successful requests")[3]) == 1.0
    assert float(_row(out, "Request throughput (req/s)")[3]) < 0.8


def test_plot_writes_latency_cdfs_and_the_rate_sweep(tmp_path, capsys):
    with FakeOpenAI(ttft=0.01, itl=0.002) as fake:
        bench(tmp_path, fake.url, "--num-prompts", "8", "--random-output-len", "4", "--request-rate", "200,inf",
              "--plot", str(tmp_path / "plots"))
    for name in ("latency_cdf.png", "rate_sweep.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"wrote {tmp_path / 'plots' / 'rate_sweep.png'}" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error_before_any_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with FakeOpenAI() as fake:
        assert main(["bench", "serve", "--url", fake.url, "--plot", str(tmp_path), *SMALL]) == 2
        assert fake.count == 0
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def idle_fake():
    with FakeOpenAI() as fake:
        yield fake


@pytest.mark.parametrize("argv, message", [
    ([], "--url is required"),
    (["--url", "http://127.0.0.1:1"], "cannot reach the server"),
    (["--url", "localhost:8000"], "expected http://host:port"),
    (["--url", "http://[::1"], "--url http://[::1: not a valid URL"),
    (["URL", "--request-rate", "fast"], "--request-rate: expected numbers or inf"),
    (["URL", "--request-rate", "4,0"], "rates must be > 0"),
    (["URL", "--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["URL", "--dataset", "sharegpt"], "--dataset sharegpt needs --dataset-path"),
    (["URL", "--dataset", "sharegpt", "--dataset-path", "/no/such.json"], "no such file"),
    (["URL", "--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
    (["URL", "--percentiles", "50,150"], "--percentiles: percentiles must be in (0, 100]"),
    (["URL", "--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    (["URL", "--num-clients", "0"], "--num-clients must be at least 1"),
    (["URL", "--burstiness", "0"], "--burstiness must be a finite number > 0"),
    (["URL", "--burstiness", "inf"], "--burstiness must be a finite number > 0"),
    (["URL", "--timeout", "inf"], "--timeout must be a finite number of seconds > 0"),
    (["URL", "--slo-ttft-ms", "inf"], "--slo-ttft-ms must be a finite number > 0"),
    (["URL", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["URL", "--slo-ttft-ms", "-5"], "--slo-ttft-ms must be a finite number > 0"),
    (["URL", "--model", "nope"], "--model 'nope': the server serves 'fake'"),
    (["URL", "--tokenizer", "/no/such/dir"], "--tokenizer '/no/such/dir': no such file or directory"),
    (["URL", "--endpoint", "chat", "--backend", "openai"], "--backend openai contradicts --endpoint chat"),
    (["--compare", "/no/a.json", "/no/b.json"], "--compare /no/a.json"),
    (["URL", "--out", "/tmp"], "--out /tmp: is a directory"),
    (["URL", "--out", "/etc/hostname/x.json"], "/etc/hostname is not a directory"),
])
def test_bad_input_is_one_line_naming_the_problem(idle_fake, argv, message, capsys):
    argv = [a if a != "URL" else "--url" for a in argv]
    if argv and argv[0] == "--url" and len(argv) > 1 and argv[1].startswith("-"):
        argv.insert(1, idle_fake.url)
    assert main(["bench", "serve", *argv, "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert idle_fake.count == 0


@pytest.mark.parametrize("case", ["deep dataset", "tokenizer side file"])
def test_bad_files_are_one_line_naming_them(idle_fake, tmp_path, case, capsys):
    """A dataset nested past the JSON parser's depth and a tokenizer directory whose tokenizer_config.json is not
    an object: one line naming the file, nothing sent."""
    from tests.support import make_byte_tokenizer
    if case == "deep dataset":
        (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
        argv, message = ["--dataset", "sharegpt", "--dataset-path", str(tmp_path / "deep.json")], \
            f"--dataset-path {tmp_path / 'deep.json'}: cannot be read as JSON"
    else:
        make_byte_tokenizer(str(tmp_path))
        (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
        argv, message = ["--tokenizer", str(tmp_path)], \
            f"--tokenizer {tmp_path / 'tokenizer_config.json'}: must hold a JSON object"
    assert main(["bench", "serve", "--url", idle_fake.url, *argv, "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert idle_fake.count == 0


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    assert main(["bench", "serve", "--compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a jaxdyn bench result" in capsys.readouterr().err
    for text in ('{"runs": [{}]}', '{"runs": []}', '{"runs": 3}', '{"summary": 5}'):
        (tmp_path / "y.json").write_text(text)
        assert main(["bench", "serve", "--compare", str(tmp_path / "y.json"), str(tmp_path / "y.json")]) == 2
        err = capsys.readouterr().err
        assert "--compare" in err and "Traceback" not in err and err.count("\n") == 1, (text, err)


def test_client_processes_get_requests_in_proportion_to_their_concurrency_shares():
    """--max-concurrency over --num-clients: the shares add up to the bound and the requests follow the shares (a
    process of one slot dealt as many requests as one of two ran alone half the run), conversations kept whole."""
    from serving.bench.serve import deal_requests
    samples = [datasets.Sample("p", 1, 1) for _ in range(30)]
    parts, limits = deal_requests(samples, 2, 3)
    assert limits == [2, 1] and [len(p) for p in parts] == [20, 10]
    parts, limits = deal_requests(samples, 4, 1)
    assert limits == [1] and [len(p) for p in parts] == [30]
    parts, limits = deal_requests(samples, 3, None)
    assert limits == [None] * 3 and [len(p) for p in parts] == [10, 10, 10]
    turns = [datasets.Sample("p", 1, 1, conversation=c, turn=t) for c in range(5) for t in range(3)]
    parts, _ = deal_requests(turns, 2, 3)
    assert all(len({turns[i].conversation for i in p} & {turns[i].conversation for i in q}) == 0
               for p in parts for q in parts if p is not q)


def test_the_command_recorded_leaves_the_api_key_out(tmp_path, capsys):
    with FakeOpenAI(ttft=0.001, itl=0.0005) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "1", "--random-output-len", "2", "--api-key", "sk-SECRET-1")
    assert "sk-SECRET" not in doc["config"]["command"] and "--api-key '***'" in doc["config"]["command"]
    assert "sk-SECRET" not in capsys.readouterr().out + (tmp_path / "run.json").read_text()


def test_model_may_be_the_served_models_directory_or_named_apart(tmp_path, capsys):
    """``--model DIR`` of a server that serves DIR under its folder's name (jaxdyn serve's default) sends that
    name; ``--served-model-name`` names it apart (vLLM's flag), checked against /v1/models."""
    folder = tmp_path / "fake"
    folder.mkdir()
    with FakeOpenAI(ttft=0.001, itl=0.0005) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "2", "--random-output-len", "2", "--model", str(folder))
        assert doc["config"]["model"] == "fake" and {b["model"] for b in fake.bodies} == {"fake"}
        doc = bench(tmp_path, fake.url, "--num-prompts", "2", "--random-output-len", "2", "--model", "x",
                    "--served-model-name", "fake")
        assert doc["config"]["model"] == "fake"
        assert main(["bench", "serve", "--url", fake.url, "--served-model-name", "nope", *SMALL]) == 2
        assert "--served-model-name 'nope': the server serves 'fake'" in capsys.readouterr().err


def test_a_malformed_chunk_or_usage_fails_that_request_only(tmp_path):
    """A chunk whose choice is null, or a usage whose count is not a number: that request fails with the reason
    (counted, out of the latencies); the others complete and the results are written."""
    with FakeOpenAI(ttft=0.005, itl=0.001) as fake:
        fake.malformed_every, fake.bad_usage_every = 3, 4
        doc = bench(tmp_path, fake.url, "--num-prompts", "12", "--random-output-len", "3")
    s = doc["runs"][0]["summary"]
    assert s["failed"] == 6 and s["completed"] == 6, s       # 3, 6, 9, 12 malformed; 4 and 8 bad usage
    errors = [r["error"] for r in doc["runs"][0]["requests"] if not r["success"]]
    assert sum(e.startswith("malformed event") for e in errors) == 4
    assert sum(e.startswith("malformed usage") for e in errors) == 2


def test_an_aborted_or_unparseable_stream_fails_that_request_only(tmp_path):
    """A stream ending with finish_reason "abort" (vLLM's aborted request, its output cut short) counted as a
    success; an event nested past the JSON parser's depth raised RecursionError out of the run (every record lost).
    Both fail their request with the reason; the others complete."""
    with FakeOpenAI(ttft=0.005, itl=0.001) as fake:
        fake.abort_every, fake.nested_every = 3, 5
        doc = bench(tmp_path, fake.url, "--num-prompts", "10", "--random-output-len", "3")
    s = doc["runs"][0]["summary"]
    assert s["failed"] == 5 and s["completed"] == 5, s          # 3, 6, 9 aborted; 5, 10 nested
    errors = [r["error"] for r in doc["runs"][0]["requests"] if not r["success"]]
    assert sum(e.startswith("the server aborted the request") for e in errors) == 3
    assert sum(e.startswith("malformed event") for e in errors) == 2


def test_a_rate_whose_gaps_overflow_is_refused(tmp_path, capsys):
    """--request-rate 1e-320 made the mean gap inf (the run hung); with a tiny --burstiness the gaps were NaN
    (every request at once, reported as a valid rate)."""
    for extra in (["--request-rate", "1e-320"], ["--request-rate", "5", "--burstiness", "1e-320"]):
        assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-prompts", "2", *extra]) == 2
        assert "overflows" in capsys.readouterr().err


def test_sharegpt_lengths_take_the_output_len_given_and_the_json_says_how_to_rerun(tmp_path):
    with FakeOpenAI(ttft=0.001, itl=0.0005) as fake:
        doc = bench(tmp_path, fake.url, "--num-prompts", "5", "--dataset", "sharegpt-lengths", "--output-len", "8")
        assert [b["max_tokens"] for b in fake.bodies] == [8] * 5
    cfg = doc["config"]
    assert cfg["sharegpt_replies"] == "chatgpt" and cfg["output_len"] == 8
    assert cfg["command"].startswith("jaxdyn ") and "--output-len 8" in cfg["command"]


# ---- the real server on the demo model -------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server():
    mesh, loaded, tok = load_model(DEMO_MODEL, dtype=jnp.float32)
    core = EngineCore(loaded.graphdef, loaded.state, mesh, loaded.config, tok,
                      EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=64, max_num_seqs=8,
                                   max_model_len=128, token_buckets=(64,), page_buckets=(8,),
                                   fail_on_compile=True, seed=0))
    core.warmup()
    state = ServerState("demo")
    state.engine = AsyncEngine(core)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", core
    server.should_exit = True
    thread.join(10)
    state.engine.shutdown()


def test_against_the_real_server_token_counts_equal_its_usage(tmp_path, demo_server, demo_tokenizer):
    url, core = demo_server
    argv = ["--tokenizer", DEMO_MODEL, "--num-prompts", "6", "--random-input-len", "20", "--random-output-len", "8",
            "--random-range-ratio", "0.3", "--max-concurrency", "4"]
    usage = bench(tmp_path, url, *argv, name="usage.json")["runs"][0]
    counted = bench(tmp_path, url, *argv, "--no-stream-usage", name="counted.json")["runs"][0]
    assert usage["summary"]["completed"] == counted["summary"]["completed"] == 6
    for u, c in zip(usage["requests"], counted["requests"]):
        assert u["token_source"] == u["prompt_token_source"] == "usage"
        assert u["output_tokens"] == u["max_tokens"] == c["max_tokens"]                    # ignore_eos
        assert c["token_source"] == c["prompt_token_source"] == "tokenizer"
        assert u["prompt_len"] == c["prompt_len"]               # the same prompts: tokenizer count == usage
        assert u["cached_tokens"] is not None
    assert len({u["prompt_len"] for u in usage["requests"]}) > 1            # the range ratio varies them
    assert usage["summary"]["total_output_tokens"] == sum(u["max_tokens"] for u in usage["requests"])
    assert usage["summary"]["peak_concurrency"] == 4
    # re-encoding the streamed text only approximates the tokens generated (BPE merges differ): hence usage first
    total = usage["summary"]["total_output_tokens"]
    assert 0.75 * total <= counted["summary"]["total_output_tokens"] <= 1.25 * total
    assert core.metrics.compilations_after_warmup == 0


def test_multiturn_chat_against_the_real_server(tmp_path, demo_server):
    url, _ = demo_server
    run = bench(tmp_path, url, "--tokenizer", DEMO_MODEL, "--endpoint", "chat", "--dataset", "multiturn",
                "--num-prompts", "6", "--num-turns", "2", "--turn-len", "10", "--output-len", "6")["runs"][0]
    assert run["summary"]["completed"] == 6 and run["summary"]["total_output_tokens"] == 36
    by_key = {(r["conversation"], r["turn"]): r for r in run["requests"]}
    for c in range(3):
        first, second = by_key[(c, 0)], by_key[(c, 1)]
        # the second turn's prompt holds the first prompt, the 6-token reply and a 10-token message
        assert second["prompt_len"] >= first["prompt_len"] + 6 + 10


def test_a_plot_folder_that_cannot_be_written_is_named_before_any_request(tmp_path, capsys):
    with FakeOpenAI() as fake:
        assert main(["bench", "serve", "--url", fake.url, "--plot", "/proc/no/plots", *SMALL]) == 2
        assert fake.count == 0
    err = capsys.readouterr().err
    assert "--plot /proc/no/plots: cannot write there" in err and "Traceback" not in err, err
