"""The benchmark suite's plumbing on the CPU: sections in subprocesses, budgets, skips, one report with ratios."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu import gpu, suite, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    # conftest's 8 virtual CPU devices are for the tensor-parallel tests, not for the suite's subprocesses
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_dry_run_of_three_sections_writes_a_report_with_every_section_and_its_ratios(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu.gpu", "--dry-run", "--out", str(out),
                        "--scratch", str(tmp_path / "scratch"), "--sections", "host,offline,step"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["report.md", "results.json", "suite.log"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["device"]["platform"] == "cpu" and doc["device"]["jax"]
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [("offline", "ok"), ("host", "ok"), ("step", "ok")]
    figures = {s["name"]: s["figures"] for s in doc["sections"]}
    # host: wall time per engine step against the same step back to back, and the idle share
    step_wall = [f for f in figures["host"] if f["name"].startswith("engine step")]
    assert len(step_wall) == 2 and all(f["ratio"] > 0 for f in step_wall)
    idle = [f["value"] for f in figures["host"] if "idle share" in f["name"]]
    assert len(idle) == 2 and all(v < 1 for v in idle)
    # offline: output tok/s against the published anchors, the prefix dataset against the random one
    anchors = {f["anchor_key"] for f in figures["offline"] if f["anchor_key"]}
    assert anchors == {"vllm_h100_offline", "sglang_h100_offline", "sglang030_a100_rate_inf"}
    # ... set beside the ShareGPT-shaped run (the anchors' workload), not the random one
    assert all("sharegpt-lengths" in f["name"] for f in figures["offline"] if f["anchor_key"])
    # the runs' matmul FLOP/s against the matmul rate measured in the same process (not for the prefix run)
    mfu = sorted(f["name"] for f in figures["offline"] if f["unit"] == "TFLOP/s")
    sg = "offline matmul TFLOP/s, sharegpt-lengths (mean 215/198, chatgpt replies)"
    assert mfu == ["offline matmul TFLOP/s, random 64/16", sg, sg + " (whole steps)"]
    # the ShareGPT-shaped run with split steps against the same run with whole steps (its own prompts, not cached)
    split = [f for f in figures["offline"] if "whole steps" in f["anchor_label"]]
    assert len(split) == 1 and split[0]["unit"] == "tok/s" and split[0]["ratio"] > 0
    assert all(f["value"] > 0 and f["ratio"] > 0 for f in figures["offline"])
    # step: decode against its memory floor, prefill against the matmul rate
    assert {f["unit"] for f in figures["step"]} >= {"ms", "TFLOP/s"}
    report = (out / "report.md").read_text()
    for heading in ("## offline:", "## host:", "## step:", "## Figures against their floors and anchors"):
        assert heading in report
    assert "Device: **cpu** × 1" in report and "jax " in report
    assert report.count("python -m benchmarks.gpu.suite section") == 3      # the exact command of each step
    assert "jaxdyn bench offline --model tiny" in report
    # the offline runs' engine loop: steps, host and device-wait ms a step, for every dataset
    offline_rows = [ln for ln in report.splitlines() if ln.startswith(("| random 64/16 |", "| sharegpt-lengths",
                                                                         "| prefix 48+16/16 |"))]
    assert len(offline_rows) == 4
    for ln in offline_rows:
        steps, host_ms, call_ms, wait_ms, fill, calls = [c.strip() for c in ln.strip("|").split("|")][-6:]
        assert int(steps) > 0 and float(host_ms) > 0 and float(wait_ms) > 0, ln
        assert 0 < float(call_ms) < float(host_ms), ln                     # the calls are part of the host time
        assert 0 < float(fill) <= 1 and float(calls) > 0, ln
    assert "Step costs measured at warm-up" in report and "--no-split-steps" in report
    assert "× |" in report                                                  # ratios in the figures table
    assert "research.aimultiple.com" in report and "benchmark_vllm_060" in report


def test_a_missing_module_skips_its_section_and_a_step_past_its_budget_is_stopped(tmp_path):
    base = suite.dry_run_plan("benchmarks.gpu.suite")
    host = next(s for s in base.sections if s.name == "host")
    plan = suite.Plan(name="test", entry="benchmarks.gpu.suite", env=base.env, probe_budget_s=60, sections=(
        suite.Section("serve", "needs a module that is not there", host.steps, ("no_such_module_for_the_suite",)),
        # a million decode steps: it can only end by its 6 s budget
        suite.Section("host", host.title, (suite.Step("host", 6.0, dict(host.steps[0].config, steps=10**6)),)),
    ))
    old = dict(os.environ)
    os.environ.update(_env())
    try:
        rc = suite.Driver(plan, str(tmp_path / "out"), scratch=str(tmp_path / "scratch")).run()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert rc == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    skipped, stopped = doc["sections"]
    assert skipped["status"] == "skipped" and "no_such_module_for_the_suite" in skipped["reason"]
    assert stopped["status"] == "timed out" and stopped["steps"][0]["seconds"] < 30
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| serve | skipped |" in report and "| host | timed out |" in report


def test_the_kernels_report_becomes_figures_against_bandwidth_and_matmul_rate():
    with open(os.path.join(ROOT, "benchmarks", "results", "kernels_h100.md")) as f:
        figures, measured = suite.kernels_figures(f.read())
    assert measured == {"hbm_bandwidth": pytest.approx(2.69e12), "matmul_rate": pytest.approx(654e12)}
    decode = {f["name"]: f for f in figures if f["name"].startswith("decode")}
    # batch 128, context 2048, head_dim 128: 537 MB of KV in 512.7 µs, 0.78 of 2.69 TB/s
    assert decode["decode attention b128 c2048 d128"]["ratio"] == pytest.approx(1 / 0.78, rel=0.01)
    prefill = [f for f in figures if f["name"].startswith("prefill")]
    assert prefill and all(0 < f["ratio"] < 1 for f in prefill)


@pytest.mark.parametrize("entry", [gpu, tpu])
@pytest.mark.parametrize("quick", [False, True])
def test_each_plan_fits_its_device_calls(entry, quick):
    plan = entry.plan(quick=quick)
    groups = plan.call_groups()
    assert sorted(n for g in groups for n in g) == sorted(s.name for s in plan.sections)   # each section once
    assert all(plan.budget(list(g)) + plan.probe_budget_s < 560 for g in groups)
    assert [s.name for s in plan.sections][0] == "serve"     # first: its first start finds the cache empty
    assert all(st.budget_s > 0 for s in plan.sections for st in s.steps)


def test_schedule_simulation_pads_to_buckets_and_finishes_every_request():
    from benchmarks.schedule_sim import simulate
    prompts, outputs = [40, 7, 300, 12], [5, 1, 9, 30]
    exact = tuple(range(1, 65))
    s_exact, steps, eff = simulate(prompts, outputs, exact, max_seqs=4, budget=64)
    assert eff == 1.0                              # a bucket of every size: no padding
    # the longest request alone needs its prompt's chunks and one step per output token
    assert steps >= 300 // 64 + 30
    s_coarse, steps_coarse, eff_coarse = simulate(prompts, outputs, (16, 64), max_seqs=4, budget=64)
    assert steps_coarse == steps and eff_coarse < 1.0 and s_coarse >= s_exact


def test_serve_flags_carry_the_engine_and_the_compile_order():
    from benchmarks.gpu.gpu import ENGINE
    from benchmarks.gpu.suite import serve_flags
    from serving.cli import _engine_config, build_parser
    flags, buckets = serve_flags("/m", "llama-3.1-8b", ENGINE, "bfloat16", 8123)
    cfg = _engine_config(build_parser().parse_args(["serve", *flags, *buckets]))
    assert (cfg.max_num_seqs, cfg.num_pages, cfg.token_buckets) == (
        ENGINE["max_num_seqs"], ENGINE["num_pages"], tuple(ENGINE["token_buckets"]))
    assert cfg.first_compiles_alone is False
    assert cfg.prefill_programs == 1056 and cfg.seq_buckets == ((2048, 512),)
    flags, buckets = serve_flags("/m", "x", {**ENGINE, "first_compiles_alone": True}, "bfloat16", 8123)
    assert _engine_config(build_parser().parse_args(["serve", *flags, *buckets])).first_compiles_alone is True
    assert cfg.attention_programs == 0 and cfg.schedule_policy == "fcfs"
    flags, buckets = serve_flags("/m", "x", {**ENGINE, "attention_programs": 1056, "schedule_policy": "lof",
                                             "prefill_programs": None, "seq_buckets": []}, "bfloat16", 8123)
    cfg = _engine_config(build_parser().parse_args(["serve", *flags, *buckets]))
    assert cfg.attention_programs == 1056 and cfg.schedule_policy == "lof"
    assert cfg.prefill_programs is None and cfg.seq_buckets == ()
    flags, buckets = serve_flags("/m", "x", {**ENGINE, "prefill_programs": 264, "seq_buckets": [[2048, 256]]},
                                 "bfloat16", 8123)
    cfg = _engine_config(build_parser().parse_args(["serve", *flags, *buckets]))
    assert cfg.prefill_programs == 264 and cfg.seq_buckets == ((2048, 256),)
    assert cfg.sampler_switch is None and cfg.separate_sampler is False        # by device, as the server's default
    assert cfg.gpu_memory_utilization is None                                  # the server's environment's
    flags, buckets = serve_flags("/m", "x", {**ENGINE, "gpu_memory_utilization": 0.7}, "bfloat16", 8123)
    assert _engine_config(build_parser().parse_args(["serve", *flags, *buckets])).gpu_memory_utilization == 0.7
    for switch in (True, False, "plain_full"):
        flags, buckets = serve_flags("/m", "x", {**ENGINE, "sampler_switch": switch}, "bfloat16", 8123)
        assert _engine_config(build_parser().parse_args(["serve", *flags, *buckets])).sampler_switch == switch
    for separate in (True, "except_greedy"):
        flags, buckets = serve_flags("/m", "x", {**ENGINE, "separate_sampler": separate, "sampler_switch": False},
                                     "bfloat16", 8123)
        cfg = _engine_config(build_parser().parse_args(["serve", *flags, *buckets]))
        assert cfg.separate_sampler == separate and cfg.sampler_switch is False


def test_measured_runs_order_whole_split_unpadded_bound():
    from benchmarks.schedule_sim import measured_runs
    prompts, outputs = [40, 7, 300, 12, 90, 33], [5, 1, 9, 30, 60, 2]
    costs = {4: 1.0, 16: 1.5, 64: 5.0}
    runs = measured_runs(prompts, outputs, costs, kv_tb_s=4.0, floor_ms=1.0, max_seqs=8)
    labels = [label for label, _ in runs]
    assert labels[0] == "whole steps" and labels[1] == "split steps" and labels[2].startswith("no padding")
    whole, split, unpadded, bound = (s for _, s in runs)
    # a bucket of every size is never dearer than padding to the measured ones, whole or split
    assert unpadded <= split <= whole and unpadded < whole
    assert bound <= unpadded           # the largest bucket's rate a token is the cheapest of these costs


def test_unpadded_costs_interpolate_between_buckets():
    from benchmarks import schedule_sim
    # one request of 40 prompt tokens and one output token: the simulation's prompt step of 40 tokens, then
    # one decode step (1 token, the smallest bucket's cost, and the KV read of the 40 tokens before it)
    runs = dict(schedule_sim.measured_runs([40], [1], {16: 1.5, 64: 5.0}, kv_tb_s=4.0, floor_ms=1.0))
    kv_ms = 40 * schedule_sim.KV_BYTES_PER_TOKEN / 4e12 * 1e3
    unpadded = next(s for label, s in runs.items() if label.startswith("no padding"))
    # 40 tokens lie halfway between the buckets 16 and 64: 1.5 + (5.0 - 1.5) / 2 ms
    assert unpadded * 1e3 == pytest.approx(3.25 + 1.5 + kv_ms, rel=1e-6)
    assert runs["whole steps"] * 1e3 == pytest.approx(5.0 + 1.5 + kv_ms, rel=1e-6)
    # a fixed attention cost falls on the step with decode rows only (the decode step), not on the prompt's
    fixed = dict(schedule_sim.measured_runs([40], [1], {16: 1.5, 64: 5.0}, kv_tb_s=4.0, floor_ms=1.0,
                                            attn_fixed_ms=0.7))
    assert fixed["whole steps"] * 1e3 == pytest.approx(5.0 + 1.5 + kv_ms + 0.7, rel=1e-6)
    parts = schedule_sim.bucket_breakdown([40], [1], {16: 1.5, 64: 5.0}, kv_tb_s=4.0, attn_fixed_ms=0.7)
    assert parts[16][2] * 1e3 == pytest.approx(kv_ms + 0.7, rel=1e-6) and parts[64][2] == 0


def test_quant_reaches_the_engine_sections_model_and_the_report_says_so(tmp_path):
    plan = gpu.plan(quant="fp8")
    by_name = {sec.name: sec for sec in plan.sections}
    for name in ("serve", "offline", "host"):
        assert by_name[name].steps[0].config["quant"] == "fp8"
    assert "ceiling" not in by_name or not by_name["ceiling"].steps[0].config.get("quant")
    assert any("fp8" in n for n in plan.notes) and "fp8" in plan.name
    assert not any("quantized" in n for n in gpu.plan().notes)
    assert suite.quant_overrides({"quant": "fp8"}) == {"jaxdyn_quantization": "fp8"}
    assert suite.quant_overrides({"quant": None}) == {}
    path = suite.model_dir("llama-3.2-1b", str(tmp_path), **suite.quant_overrides({"quant": "fp8"}))
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["jaxdyn_quantization"] == "fp8"


def test_the_dry_run_refuses_quant(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--out", "/tmp/never", "--dry-run", "--quant", "fp8"])
    assert "--quant" in capsys.readouterr().err


def test_bucket_breakdown_adds_up_to_the_whole_steps_run():
    from benchmarks import schedule_sim
    prompts, outputs = [40, 7, 300, 12, 90, 33], [5, 1, 9, 30, 60, 2]
    costs = {4: 1.0, 16: 1.5, 64: 5.0}
    parts = schedule_sim.bucket_breakdown(prompts, outputs, costs, kv_tb_s=4.0, max_seqs=8)
    whole = dict(schedule_sim.measured_runs(prompts, outputs, costs, kv_tb_s=4.0, floor_ms=1.0, max_seqs=8))
    assert set(parts) == set(costs)
    assert sum(c + k for _, c, k in parts.values()) == pytest.approx(whole["whole steps"], rel=1e-9)
    for b, (n, c, k) in parts.items():
        assert c == pytest.approx(n * costs[b] / 1e3) and k >= 0
    # the longest request's 60 outputs end alone: single-token steps, the smallest bucket
    assert parts[4][0] >= 60 - 30


def test_schedule_sim_orders_admission_longest_output_first(capsys):
    from benchmarks import schedule_sim
    schedule_sim.main(["--num-prompts", "60", "--costs", "16:1,64:2,256:5", "--order", "lof"])
    lof = capsys.readouterr().out
    schedule_sim.main(["--num-prompts", "60", "--costs", "16:1,64:2,256:5"])
    fcfs = capsys.readouterr().out
    assert "--order lof" in lof and "--order" not in fcfs

    def rate(out):      # the whole-steps run's output tok/s (its seconds are rounded to 0.1 s: 1.3 both ways)
        line = next(line for line in out.splitlines() if line.startswith("| whole steps"))
        return int(line.split("|")[3].replace(",", ""))
    # the same requests, their longest outputs started first: a shorter tail, so a faster run here
    assert rate(lof) > rate(fcfs)


def test_kv_cache_dtype_reaches_the_engine_sections_and_the_served_flags():
    from serving.cli import _engine_config, build_parser
    plan = gpu.plan(quant="fp8", kv_cache_dtype="fp8")
    by_name = {sec.name: sec for sec in plan.sections}
    for name in ("serve", "offline", "host"):
        assert by_name[name].steps[0].config["engine"]["kv_cache_dtype"] == "fp8"
    assert "fp8 KV cache" in plan.name and any("KV cache is fp8" in n for n in plan.notes)
    assert "kv_cache_dtype" not in gpu.ENGINE and not any("KV cache" in n for n in gpu.plan().notes)
    flags, buckets = suite.serve_flags("/m", "x", by_name["serve"].steps[0].config["engine"], "bfloat16", 8123)
    assert _engine_config(build_parser().parse_args(["serve", *flags, *buckets])).kv_cache_dtype == "fp8"
    flags, buckets = suite.serve_flags("/m", "x", gpu.ENGINE, "bfloat16", 8123)
    assert "--kv-cache-dtype" not in flags and "--skip-idle-prefill" not in flags
    flags, buckets = suite.serve_flags("/m", "x", dict(gpu.ENGINE, skip_idle_prefill=True), "bfloat16", 8123)
    assert _engine_config(build_parser().parse_args(["serve", *flags, *buckets])).skip_idle_prefill is True


def test_kv_cache_dtype_is_refused_where_the_plan_has_none(capsys):
    for argv in (["--dry-run"], []):
        with pytest.raises(SystemExit):
            suite.main(["--out", "/tmp/never", *argv, "--kv-cache-dtype", "fp8"], plan_factory=None if argv else
                       __import__("benchmarks.gpu.tpu", fromlist=["plan"]).plan)
        assert "--kv-cache-dtype" in capsys.readouterr().err


def test_an_fp8_lm_head_reaches_the_engine_sections_model(tmp_path, capsys):
    from jaxdyn.config import ModelConfig
    plan = gpu.plan(quant="fp8", quantize_lm_head=True)
    by_name = {sec.name: sec for sec in plan.sections}
    for name in ("serve", "offline", "host"):
        cfg = by_name[name].steps[0].config
        assert cfg["quant"] == "fp8" and cfg["quantize_lm_head"] is True
    assert "fp8 lm_head" in plan.name and "lm_head" not in gpu.plan(quant="fp8").name
    assert not gpu.plan(quant="fp8").sections[0].steps[0].config["quantize_lm_head"]
    fields = suite.quant_overrides({"quant": "fp8", "quantize_lm_head": True})
    assert fields == {"jaxdyn_quantization": "fp8", "jaxdyn_quantize_lm_head": True}
    mc = ModelConfig.from_pretrained(suite.model_dir("llama-3.2-1b", str(tmp_path), **fields))
    assert mc.quantization == "fp8" and mc.quantize_lm_head
    for argv in (["--quantize-lm-head"], ["--quant", "int8", "--quantize-lm-head"]):
        with pytest.raises(SystemExit):
            suite.main(["--out", "/tmp/never", *argv], plan_factory=gpu.plan, entry="benchmarks.gpu.gpu")
        assert "--quantize-lm-head needs --quant fp8" in capsys.readouterr().err
    from benchmarks.gpu import tpu          # a plan without the option refuses it by name, not with a TypeError
    with pytest.raises(SystemExit):
        suite.main(["--out", "/tmp/never", "--quant", "fp8", "--quantize-lm-head", "--list"], plan_factory=tpu.plan,
                   entry="benchmarks.gpu.tpu")
    assert "benchmarks.gpu.tpu's plan has no fp8 lm_head" in capsys.readouterr().err


def test_every_engine_section_of_the_gpu_and_tpu_plans_is_a_valid_runner_config():
    """The suite's engine carries seq_buckets and prefill_programs: the sections with fewer sequence slots (host:
    256, the TPU's: 128) must drop the pair their 2,048 bucket cannot have fewer slots than, or the run fails."""
    from jaxdyn.engine.runner import RunnerConfig
    for plan in (gpu.plan(), gpu.plan(quant="fp8", kv_cache_dtype="fp8"), tpu.plan()):
        engines = [step.config["engine"] for sec in plan.sections for step in sec.steps if "engine" in step.config]
        assert len(engines) >= 3
        for e in engines:
            cfg = suite._engine_config(e)
            RunnerConfig(page_size=cfg.page_size, num_pages=cfg.num_pages or 512,
                         max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                         max_model_len=cfg.max_model_len, token_buckets=cfg.token_buckets,
                         page_buckets=cfg.page_buckets, seq_buckets=cfg.seq_buckets,
                         prefill_programs=cfg.prefill_programs)
    assert gpu.ENGINE["seq_buckets"] == [[2048, 512]] and tpu.ENGINE["seq_buckets"] == []


def test_engine_with_drops_the_seq_buckets_pairs_the_overrides_leave_no_room_for():
    base = gpu.ENGINE
    assert gpu.engine_with(base, {})["seq_buckets"] == [[2048, 512]]
    assert gpu.engine_with(base, {"max_num_seqs": 512})["seq_buckets"] == []              # 2,048's own: 512 slots
    assert gpu.engine_with(base, {"max_num_seqs": 600})["seq_buckets"] == [[2048, 512]]
    assert gpu.engine_with(base, {"token_buckets": [16, 128]})["seq_buckets"] == []       # no 2,048 bucket
    assert gpu.engine_with(base, {"token_buckets": None})["seq_buckets"] == [[2048, 512]]  # powers of two to 2,048
    assert gpu.engine_with(base, {"token_buckets": None, "max_num_batched_tokens": 4096})["seq_buckets"] == [[2048, 512]]
    assert gpu.engine_with(base, {"token_buckets": None, "max_num_batched_tokens": 1500})["seq_buckets"] == []
    # named: kept as given (the runner refuses a pair it cannot have, naming the field)
    assert gpu.engine_with(base, {"max_num_seqs": 256, "seq_buckets": [[2048, 128]]})["seq_buckets"] == [[2048, 128]]
    assert gpu.engine_with(base, {"seq_buckets": [[64, 8]]})["seq_buckets"] == [[64, 8]]
    assert base["seq_buckets"] == [[2048, 512]]                                            # the base unchanged
    assert gpu.engine_with(gpu.engine_with(base, {"seq_buckets": [[100, 8]]}), {})["seq_buckets"] == [[100, 8]]
    assert gpu.engine_with(base, {"seq_buckets": None})["seq_buckets"] == []
    with pytest.raises(ValueError, match="seq_buckets: expected"):
        gpu.engine_with(base, {"seq_buckets": [[2048]]})


def test_engine_with_keeps_the_kv_pools_bytes_when_the_kv_dtype_changes():
    base = gpu.ENGINE                                   # bf16 pages: 40 GiB in the 8B shape
    assert base["num_pages"] == 20480 and "kv_cache_dtype" not in base
    fp8 = gpu.engine_with(base, {"kv_cache_dtype": "fp8"})
    assert fp8["num_pages"] == 40960 and gpu.engine_with(base, {"kv_cache_dtype": "fp8_e4m3"})["num_pages"] == 40960
    assert gpu.engine_with(fp8, {"kv_cache_dtype": "auto"})["num_pages"] == 20480
    assert gpu.engine_with(fp8, {"max_num_seqs": 256})["num_pages"] == 40960         # no dtype named: as it was
    assert gpu.engine_with(base, {"kv_cache_dtype": "fp8", "num_pages": 999})["num_pages"] == 999   # named: kept
    assert gpu.engine_with(base, {"kv_cache_dtype": "int4"})["num_pages"] == 20480    # unknown: the engine names it
    # the plan's fp8-KV engines hold fp8's count, its bf16 ones bf16's
    for kv, pages in (("auto", 20480), ("fp8", 40960)):
        plan = gpu.plan(kv_cache_dtype=kv)
        assert {st.config["engine"]["num_pages"] for s in plan.sections if s.name in ("serve", "offline")
                for st in s.steps} == {pages}


def test_the_servers_memory_share_is_under_jaxs_own_name():
    # with the deprecated name beside a user's XLA_CLIENT_MEM_FRACTION, JAX refuses to start
    assert gpu.SERVER_ENV == {"XLA_CLIENT_MEM_FRACTION": "0.85"}
