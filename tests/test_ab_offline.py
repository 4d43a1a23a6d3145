"""benchmarks/gpu/ab_offline.py's parsing and summary (the runs themselves need a GPU)."""

import pytest

from benchmarks.gpu import ab_offline as ab


def test_parse_run_reads_profile_runs_header():
    text = ("sharegpt-lengths, 1000 prompts, engine {...}; copy bandwidth 3.71 TB/s, bf16 matmul 584 TFLOP/s "
            "(this process); the run 19.3 s, 10253 output tok/s; loaded and warmed up in 12.5 s; step costs "
            "(ms by token bucket) {16: 5.45, 2048: 48.45} (no traces).")
    assert ab.parse_run(text) == (19.3, 10253.0, 12.5, "{16: 5.45, 2048: 48.45}")
    with pytest.raises(ValueError, match="no run line"):
        ab.parse_run("Traceback: out of memory")


def test_summarize_medians_against_first_config():
    results = {0: [(20.0, 100.0, 1, ""), (19.0, 110.0, 1, ""), (21.0, 90.0, 1, "")],
               1: [(10.0, 200.0, 1, "")], 2: []}
    assert ab.summarize(results) == [(0, 100.0, 1.0), (1, 200.0, 2.0)]


def test_a_configurations_env_goes_to_its_runs_environment_not_the_engine():
    engine, env, tree = ab.split_config({"token_buckets": [16, 2048], "env": {"XLA_FLAGS": "--x=1"}},
                                        {"XLA_FLAGS": "", "PATH": "/bin"})
    assert engine == {"token_buckets": [16, 2048]} and tree is None
    assert env == {"XLA_FLAGS": "--x=1", "PATH": "/bin"}
    assert ab.split_config({}, {"PATH": "/bin"}) == ({}, {"PATH": "/bin"}, None)
    for bad in ({"env": "XLA_FLAGS=1"}, {"env": {"XLA_FLAGS": 1}}):
        with pytest.raises(ValueError, match="object of strings"):
            ab.split_config(bad, {})


def test_a_configuration_may_run_another_tree_of_the_repository(tmp_path):
    import os
    here = os.getcwd()
    engine, _, tree = ab.split_config({"tree": ".", "max_num_seqs": 8}, {})
    assert engine == {"max_num_seqs": 8} and tree == here
    for bad in (str(tmp_path), 3):
        with pytest.raises(ValueError, match="not a copy of the repository"):
            ab.split_config({"tree": bad}, {})


def test_bad_configs_are_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        ab.main(["--configs", '[{"env": {"XLA_FLAGS": 3}}]'])
    assert "object of strings" in capsys.readouterr().err


def test_a_configuration_may_quantize_the_model():
    engine, _, _ = ab.split_config({"quant": "fp8", "max_num_seqs": 8}, {})
    assert engine == {"max_num_seqs": 8}
    cmd = ab.run_command({"quant": "fp8", "max_num_seqs": 8}, engine, "sharegpt-lengths", 10, "llama-3.1-8b")
    assert cmd[-2:] == ["--quant", "fp8"] and '{"max_num_seqs": 8}' in cmd
    assert "--quant" not in ab.run_command({}, {}, "sharegpt-lengths", 10, "llama-3.1-8b")


def test_a_configuration_may_quantize_the_lm_head_of_an_fp8_model_only():
    cfg = {"quant": "fp8", "quantize_lm_head": True, "kv_cache_dtype": "fp8"}
    engine, _, _ = ab.split_config(cfg, {})
    assert engine == {"kv_cache_dtype": "fp8"}
    cmd = ab.run_command(cfg, engine, "sharegpt-lengths", 10, "llama-3.1-8b")
    assert cmd[-3:] == ["--quant", "fp8", "--quantize-lm-head"]
    assert "--quantize-lm-head" not in ab.run_command({"quant": "fp8"}, {}, "sharegpt-lengths", 10, "llama-3.1-8b")
    for bad in ({"quantize_lm_head": True}, {"quant": "int8", "quantize_lm_head": True},
                {"quant": "fp8", "quantize_lm_head": "yes"}):
        with pytest.raises(ValueError, match="quantize_lm_head"):
            ab.split_config(bad, {})


def test_the_warm_up_compilation_line_of_a_run_is_found_as_describe_compile_writes_it():
    from jaxdyn.engine.llm import describe_compile
    line = describe_compile({"parts": 30, "threads": 8, "wall_s": 80.2, "lower_s": 9.1, "compile_s": 512.4,
                             "compile_max_s": 31.0, "slowest": ("step", 2048, 128, "full"),
                             "by_tokens": {16: 40.0, 2048: 90.0}})
    assert line == ("compiled 30 executables on 8 threads in 80.2 s: XLA 512.4 s summed (the slowest 31.0 s, step "
                    "2048 tokens x 128 pages full), lowering 9.1 s; XLA s by token bucket {16: 40.0, 2048: 90.0}")
    out = f"engine {{...}}: loaded and warmed up in 93.0 s; step costs (ms by token bucket) {{16: 4.0}}\n{line}\nmore"
    assert ab.COMPILED.search(out).group(0) == line
    assert ab.COMPILED.search("engine {...}: loaded and warmed up in 9.0 s") is None


def test_a_configuration_may_sample():
    cfg = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "sampler_switch": True}
    engine, _, _ = ab.split_config(cfg, {})
    assert engine == {"sampler_switch": True}
    cmd = ab.run_command(cfg, engine, "sharegpt-lengths", 10, "llama-3.1-8b")
    assert cmd[-6:] == ["--temperature", "1.0", "--top-p", "0.9", "--top-k", "50"]


def test_bad_sampling_keys_are_refused_before_any_run():
    for bad, says in (({"top_p": 0}, "--top-p must be in"), ({"temperature": 200}, "--temperature must be in"),
                      ({"top_k": "5"}, "numbers expected"), ({"top_k": -2}, "--top-k must be")):
        with pytest.raises(ValueError, match=says):
            ab.split_config(bad, {})


def test_first_step_line_is_found_in_profile_runs_run_line():
    line = ("run: 1181 steps, 13.3 s, 14947 output tok/s; its first step began 0.312 s after the run's start "
            "(the requests tokenized and queued)")
    assert ab.FIRST_STEP.search(line).group(0) == "its first step began 0.312 s after the run's start"
    assert ab.FIRST_STEP.search("run: 5 steps, 1.0 s, 10 output tok/s") is None
