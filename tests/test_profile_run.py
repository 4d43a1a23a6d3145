"""benchmarks/gpu/profile_run.py's arithmetic (the run itself needs a GPU trace)."""

import pytest

from benchmarks.gpu import profile_run as pr


def test_kernel_kinds():
    assert pr.kind_of("gemm_fusion_dot_general") == "gemm"
    assert pr.kind_of("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "gemm"
    assert pr.kind_of("paged_decode_attention") == "decode attn"
    assert pr.kind_of("ragged_prefill_attention") == "prefill attn"
    assert pr.kind_of("input_scatter_fusion") == "kv write"
    assert pr.kind_of("rope_write_kv") == "kv write" and pr.kind_of("merge_decode_splits") == "decode attn"
    assert pr.kind_of("loop_add_fusion") == "other"


def test_busy_union_counts_overlaps_once():
    # 0-10 and 5-12 overlap (12 µs busy), 20-25 alone (5 µs)
    assert pr.busy_union([(0.0, 10.0, "a"), (5.0, 7.0, "b"), (20.0, 5.0, "c")]) == 17.0
    assert pr.busy_union([]) == 0.0


def test_window_summary_per_step():
    events = [(0.0, 4000.0, "gemm_fusion_dot"), (4000.0, 1000.0, "paged_decode_attention"),
              (6000.0, 1000.0, "gemm_fusion_dot"), (7000.0, 1000.0, "loop_add_fusion")]
    calls = [dict(step=0, tokens=10, rows=16, seqs=10, decode=10, decode_kv=1000),
             dict(step=1, tokens=10, rows=16, seqs=10, decode=10, decode_kv=3000)]
    r = pr.summarize_window(events, calls, weight_bytes=1_000_000_000, matmul_params=100, head_params=10,
                            kv_bytes_per_token=1_000_000, bandwidth=1e12, matmul=1e15)
    assert r["steps"] == 2 and r["decode ctx"] == 200.0
    assert r["span ms"] == pytest.approx(4.0) and r["idle ms"] == pytest.approx(0.5)   # 8 ms, 1 ms idle, 2 steps
    assert r["gemm ms"] == pytest.approx(2.5) and r["decode attn ms"] == pytest.approx(0.5)
    assert r["other ms"] == pytest.approx(0.5)
    assert r["gemm floor ms"] == pytest.approx(1.0)            # 1 GB at 1 TB/s a call, 2 calls over 2 steps
    assert r["decode attn floor ms"] == pytest.approx(2.0)     # 4,000 tokens x 1 MB at 1 TB/s over 2 steps


def test_loop_by_running_bins_and_no_wait_share():
    # (running, host s, wait s, tokens, prefill tokens, call s)
    loop = [(10, 0.002, 0.0, 10, 0, 0.001), (10, 0.004, 0.001, 10, 0, 0.002), (300, 0.020, 0.0, 300, 0, 0.015),
            (300, 0.010, 0.00001, 300, 0, 0.005)]
    rows = pr.loop_by_running(loop)
    assert [(lo, hi, k) for lo, hi, k, *_ in rows] == [(0, 16, 2), (256, 512, 2)]
    assert rows[0][3] == pytest.approx(3.0) and rows[0][4] == pytest.approx(0.5) and rows[0][5] == 0.5
    assert rows[1][5] == 1.0
    assert rows[0][6] == pytest.approx(1.5) and rows[1][6] == pytest.approx(10.0)


def test_top_kernels_outside_gemm_and_attention():
    events = [(0.0, 3000.0, "loop_add_fusion"), (0.0, 1000.0, "loop_add_fusion"), (0.0, 500.0, "input_scatter_fusion"),
              (0.0, 9000.0, "gemm_fusion_dot"), (0.0, 2000.0, "loop_rope_fusion")]
    top = pr.top_kernels(events, steps=2, n=2)
    assert top == [("other", "loop_add_fusion", 2.0, 1.0), ("other", "loop_rope_fusion", 1.0, 0.5)]
    assert ("kv write", "input_scatter_fusion", 0.25, 0.5) in pr.top_kernels(events, steps=2)
    # the matrix-product table takes the gemm kind alone
    assert pr.top_kernels(events, steps=2, kinds=("gemm",)) == [("gemm", "gemm_fusion_dot", 4.5, 0.5)]


def test_decode_steps_by_running_set_host_time_beside_the_bucket_cost():
    # (running, host s, wait s, tokens, prefill tokens): a prefill step is left out; 300 running decode
    # steps in the 512 bucket (cost 13 ms), one that waited 0.1 ms and one 5 ms
    loop = [(300, 0.014, 0.0001, 300, 0, 0.010), (300, 0.010, 0.005, 300, 0, 0.002), (300, 0.020, 0.02, 2048, 1900, 0.0),
            (10, 0.002, 0.003, 10, 0, 0.001)]
    rows = pr.decode_steps_by_running(loop, {16: 5.0, 512: 13.0, 2048: 47.0})
    assert [(lo, hi, k) for lo, hi, k, *_ in rows] == [(0, 16, 1), (256, 512, 2)]
    lo, hi, k, host, wait, short, cost, call = rows[1]
    assert host == pytest.approx(12.0) and wait == pytest.approx(2.55) and short == 0.5 and cost == 13.0
    assert call == pytest.approx(6.0)
    assert rows[0][6] == 5.0
    no_costs = pr.decode_steps_by_running(loop, {})
    assert [r[6] for r in no_costs] == [0.0, 0.0] and [r[3] for r in no_costs] == pytest.approx([2.0, 12.0])


def test_host_events_sum_the_host_lines_and_leave_the_gpus_out(tmp_path):
    import gzip
    import json

    from benchmarks.gpu.profile_step import host_events
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "PjRtExecute", "ts": 0, "dur": 30},
        {"ph": "X", "pid": 1, "tid": 1, "name": "PjRtExecute", "ts": 50, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 2, "name": "Update.12", "ts": 5, "dur": 4},
        {"ph": "X", "pid": 1, "tid": 1, "name": "$core.py:411 _dispatch", "ts": 0, "dur": 90},
        {"ph": "X", "pid": 2, "tid": 1, "name": "gemm_fusion", "ts": 0, "dur": 500},
    ]
    with gzip.open(d / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert host_events(str(tmp_path)) == {"PjRtExecute": (2, 40.0), "Update": (1, 4.0)}


def test_host_events_of_a_real_trace_hold_the_calls_dispatch(tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.profile_step import host_events
    f = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones(8)
    f(x).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(4):
        f(x).block_until_ready()
    jax.profiler.stop_trace()
    events = host_events(str(tmp_path))
    assert events["PjitFunction(<lambda>)"][0] >= 4
    assert all(us >= 0 for _, us in events.values())


def test_an_fp8_lm_head_needs_an_fp8_model(capsys):
    import pytest
    for argv in (["--quantize-lm-head"], ["--quant", "int8", "--quantize-lm-head"]):
        with pytest.raises(SystemExit):
            pr.main(argv)
        assert "--quantize-lm-head needs --quant fp8" in capsys.readouterr().err


def test_the_run_itself_goes_through_on_the_cpu(capsys):
    """The untraced run (``--windows none``, what ``ab_offline`` runs) on the tiny model: its wrappers of the engine's
    step and the runner's execute pass every argument through (session 29's ``scored`` keyword broke every GPU run
    of it), and its header line is what ``ab_offline`` parses."""
    from benchmarks.gpu.ab_offline import parse_run
    engine = ('{"num_pages": 1024, "max_num_seqs": 8, "max_num_batched_tokens": 128, "max_model_len": 2048, '
              '"token_buckets": [16, 128], "page_buckets": [128]}')
    assert pr.main(["--model", "tiny", "--num-prompts", "6", "--windows", "none", "--engine", engine,
                    "--bandwidth-gib", "0.01", "--matmul-n", "128"]) == 0
    seconds, tok_s, load_s, costs = parse_run(capsys.readouterr().out)
    assert seconds > 0 and tok_s > 0 and load_s > 0 and costs.startswith("{")    # (costs: measured on a GPU only)
