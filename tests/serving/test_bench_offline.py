"""jaxdyn bench offline: the engine without HTTP on the demo model (random, multi-turn and token-id prompts);
token totals are exact and throughputs their rates."""

import json

import numpy as np
import pytest

import jaxdyn.engine.llm
from jaxdyn import LLM, EngineConfig
from jaxdyn.engine.tokenizer import Tokenizer
from serving.bench import datasets
from serving.bench.offline import benchmark
from serving.cli import DEMO_MODEL, main

# One bucket (16 tokens x 4 pages) keeps the warm-up short.
ENGINE = ["--max-num-batched-tokens", "16", "--max-model-len", "64", "--max-num-seqs", "4", "--num-pages", "32",
          "--disable-tqdm"]
CONFIG = EngineConfig(max_num_batched_tokens=16, max_model_len=64, max_num_seqs=4, num_pages=32)


@pytest.fixture(scope="module")
def demo_engine():
    return jaxdyn.engine.llm.build_engine(DEMO_MODEL, config=CONFIG, warmup=False)


def offline(tmp_path, monkeypatch, demo_engine, *argv) -> dict:
    """Run the command; the demo engine is built (and compiled) once for the module."""
    def build_engine(model, *, config, **kwargs):
        assert model == DEMO_MODEL and config.max_num_batched_tokens == 16 and config.max_model_len == 64
        return demo_engine
    monkeypatch.setattr(jaxdyn.engine.llm, "build_engine", build_engine)
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", *ENGINE, "--out", str(out), *argv]) == 0
    return json.loads(out.read_text())


def _check_rates(s: dict) -> None:
    d = s["duration_s"]
    assert d > 0
    assert s["request_throughput"] == pytest.approx(s["requests"] / d)
    assert s["input_throughput"] == pytest.approx(s["total_input_tokens"] / d)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / d)
    assert s["total_token_throughput"] == pytest.approx((s["total_input_tokens"] + s["total_output_tokens"]) / d)


def test_random_prompts_on_the_demo_model(tmp_path, monkeypatch, demo_engine, capsys):
    doc = offline(tmp_path, monkeypatch, demo_engine, "--random-input-len", "12", "--random-output-len", "6", "--num-prompts", "5",
                  "--num-warmups", "2")
    s = doc["summary"]
    assert s["requests"] == 5 and s["total_output_tokens"] == 5 * 6         # ignore_eos: every request gives 6
    assert s["total_input_tokens"] == 5 * 12                                 # exact lengths, BOS included (vLLM's)
    assert doc["requests"] == [{"prompt_tokens": 12, "output_tokens": 6}] * 5
    assert doc["config"]["model"] == DEMO_MODEL and doc["config"]["max_model_len"] == 64
    _check_rates(s)
    out = capsys.readouterr().out
    assert "| Request throughput (req/s) |" in out and "| Output token throughput (tok/s) |" in out
    cfg = doc["config"]
    assert cfg["command"].startswith("jaxdyn bench offline ") and "--num-warmups 2" in cfg["command"]
    assert f"command: {cfg['command']}" in out
    assert cfg["engine"]["max_num_batched_tokens"] == 16 and "schedule_policy" in cfg["engine"]


def test_warm_up_prompts_leave_no_cache_hit_to_the_timed_run(tmp_path, monkeypatch, demo_engine):
    """--num-warmups runs the run's first prompts untimed, then empties the prefix cache: the timed run computes
    every prompt, as without a warm-up."""
    hits = demo_engine.metrics.prefix_cache_hits
    offline(tmp_path, monkeypatch, demo_engine, "--random-input-len", "40", "--random-output-len", "2",
            "--num-prompts", "4", "--num-warmups", "4", "--seed", "9")
    assert demo_engine.metrics.prefix_cache_hits == hits


def test_every_request_samples_as_the_flags_say(tmp_path, monkeypatch, demo_engine):
    """--temperature / --top-p / --top-k reach every request's SamplingParams (vLLM's benchmark flags) and the
    report's config."""
    seen = []
    generate = jaxdyn.LLM.generate

    def spy(self, prompts, params, **kw):
        seen.extend(params)
        return generate(self, prompts, params, **kw)
    monkeypatch.setattr(jaxdyn.LLM, "generate", spy)
    doc = offline(tmp_path, monkeypatch, demo_engine, "--random-input-len", "8", "--random-output-len", "3",
                  "--num-prompts", "3", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "7")
    assert len(seen) == 3 and all((p.temperature, p.top_p, p.top_k) == (0.8, 0.9, 7) for p in seen)
    assert (doc["config"]["temperature"], doc["config"]["top_p"], doc["config"]["top_k"]) == (0.8, 0.9, 7)
    assert doc["summary"]["total_output_tokens"] == 9


def test_multiturn_prompts_carry_the_conversation_so_far(tmp_path, monkeypatch, demo_engine):
    doc = offline(tmp_path, monkeypatch, demo_engine, "--dataset", "multiturn", "--num-prompts", "4", "--num-turns", "2", "--turn-len", "6",
                  "--output-len", "4")
    # two conversations; turn 0: BOS + 6 tokens; turn 1: those 7, the 4-token reply, 6 new tokens
    assert sorted(r["prompt_tokens"] for r in doc["requests"]) == [7, 7, 17, 17]
    assert doc["summary"]["total_output_tokens"] == 16
    _check_rates(doc["summary"])


def test_token_id_prompts_for_a_model_without_a_tokenizer(demo_engine):
    # what bench offline draws for a dummy preset (no tokenizer): token ids from the vocabulary size
    source = datasets.PromptSource(np.random.default_rng(0), vocab_size=demo_engine.model_config.vocab_size)
    samples = datasets.random_samples(source, 3, 10, 3)
    assert all(isinstance(s.prompt, list) and s.prompt_len == 10 for s in samples)
    s = benchmark(LLM(engine=demo_engine), samples, progress=False)
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 9 and s["requests"] == 3


def test_the_same_seed_gives_the_same_prompts():
    tok = Tokenizer.from_pretrained(DEMO_MODEL)
    make = lambda seed: datasets.random_samples(  # noqa: E731
        datasets.PromptSource(datasets.seeded_rng(seed, 1, 0), tok), 3, 12, 6)
    assert [s.prompt for s in make(0)] == [s.prompt for s in make(0)] != [s.prompt for s in make(1)]


@pytest.mark.parametrize("argv, message", [
    (["--random-input-len", "100"], "over the engine's max_model_len 64"),
    (["--dataset", "multiturn", "--num-turns", "8", "--turn-len", "8"], "over the engine's max_model_len 64"),
    (["--model", "/no/such/dir"], "no such directory"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--dataset", "sharegpt"], "--dataset sharegpt needs --dataset-path"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-k", "-3"], "--top-k must be -1, 0 or a positive integer, got -3"),
    (["--temperature", "-1"], "--temperature must be in [0, 100], got -1.0"),
    (["--temperature", "150"], "--temperature must be in [0, 100], got 150.0"),
    (["--temperature", "nan"], "--temperature must be in [0, 100], got nan"),
])
def test_bad_input_is_one_line_naming_the_problem(argv, message, capsys):
    assert main(["bench", "offline", *ENGINE, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
