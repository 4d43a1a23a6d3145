"""The benchmark suite on one NVIDIA GPU, in two device calls (< 600 s each): what every section measures there.

The GPU commands (the wheels of what the GPU image lacks are made here by
``benchmarks/gpu/fetch_wheels.sh`` and travel with each call as ``carry: [".gpu_wheels"]``), one per call
(``CALLS``; ``--list`` prints them with their budgets):

    pip install --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps && PYTHONPATH=$PWD:/tmp/pydeps python -m benchmarks.gpu.gpu --out $OUT/gpu --sections serve,offline
    pip install --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps && PYTHONPATH=$PWD:/tmp/pydeps python -m benchmarks.gpu.gpu --out $OUT/gpu --sections host,step,kernels,ceiling

The second with the GPU tests first (they get 150 s):

    pip install --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps && export PYTHONPATH=$PWD:/tmp/pydeps && timeout 150 python -m pytest -q -m gpu tests/pallas_kernels 2>&1 | tee $OUT/pytest.log; python -m benchmarks.gpu.gpu --out $OUT/gpu --sections host,step --budget-s 250

``$OUT/gpu`` receives ``report.md``, ``results.json`` and ``suite.log`` (rewritten
after every step, so a call cut short keeps what ran). Flags: ``--quick``
(smaller sizes), ``--sections serve,host,...``, ``--datasets sharegpt-lengths,prefix`` (only those
serve runs and offline datasets, no compared server), ``--budget-s N``
(every step's budget scaled to a total of N), ``--model PRESET``, ``--list``
(print the plan), ``--dry-run`` (the CPU plumbing run).

Order and budgets (the machine starts bare: every compilation counts). The
sections share one JAX compilation cache, and ``serve`` runs first so its
first start is cold and ``offline`` / ``host`` (the same engine shapes) find
its compiled steps:

| section | budget s | what |
|---|---:|---|
| probe | 30 | device kind and count (a GPU must be there) |
| serve | 370 | ``jaxdyn serve`` 8B: first start (empty cache), bench serve random 1024/128, ShareGPT-shaped (``sharegpt-lengths``) and prefix-heavy at rate inf (1,000 prompts each), ShareGPT-shaped at 4 req/s; second start (cache warm); a third start with ``--no-engine-process`` (the engine on a thread) runs the ShareGPT-shaped and prefix loads again |
| offline | 140 | ``jaxdyn bench offline`` 8B: random 1024/128, ShareGPT-shaped and prefix-heavy, 1,000 prompts each (``--offline-prompts N``), MFU of each run |
| host | 50 | device idle share between engine steps at 64 and 256 running requests (8B) |
| step | 150 | decode step vs memory floor, prefill MFU: 8B at batch 1/8/64/256 × context 512/2048 (``--full-grid``: the 1B shape's grid too) |
| kernels | 50 | ``python -m benchmarks.kernels --quick --sweep none`` |
| ceiling | 100 | the serving stack's ceiling: ``jaxdyn serve`` on the tiny preset (steps next to free) with the serve section's rate-inf ShareGPT-shaped and prefix loads |

Sections 860 s + probe 30 s: two device calls (``--sections serve,offline``, then the rest). GPU settings: every process that opens the
GPU (one at a time) gets ``XLA_CLIENT_MEM_FRACTION=0.85``; the section
that drives the server and the ``bench serve`` client run with
``JAX_PLATFORMS=cpu`` and the driver never imports jax, so the server is the
only process on the GPU while it runs. The engine sections size their KV pool
explicitly (serve and offline: 40 GiB of pages in the 8B shape, 20,480 bf16 pages of 2 MiB or 40,960 fp8 ones
of 1 MiB, which an H100 holds beside 16 GB of bf16 weights; host: 16,384).
"""

from __future__ import annotations

import dataclasses
import sys

from benchmarks.gpu import suite

DATASHEETS = (   # (device_kind substring, HBM bytes/s, dense bf16 FLOP/s, source), most specific first
    ("H100 PCIe", 2.0e12, 756e12, "NVIDIA H100 PCIe datasheet"),
    ("H100", 3.35e12, 989e12, "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense"),
    ("H200", 4.8e12, 989e12, "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 dense"),
    ("A100", 2.039e12, 312e12, "NVIDIA A100 80GB SXM datasheet: 2.0 TB/s, 312 TFLOP/s bf16 dense"),
)

# One engine shape for serve and offline (the same compiled steps, so offline loads the server's from the
# executable cache): a page bucket of the whole model length and ten token buckets. Up to 1,024 sequences: with
# 1,000 ShareGPT-shaped requests all are admitted at once, and few prompts wait per freed slot. The buckets
# between the powers of two (192, 384, 768) and 64 cut the padding of decode steps, a small gain: offline
# ShareGPT-shaped on the H200, the same call, 11,382 output tok/s (median of two) against 11,088 with
# 16/128/256/512/1024/2048, 1.027x, near the 1.9 % spread of repeated runs (``benchmarks/gpu/ab_offline.py``,
# 2026-12-03); ``schedule_sim`` with the measured costs gives 16.9 s against 17.0 s, and 16.4 s for a bucket of
# every size. Every step compiles at once at warm-up (``first_compiles_alone`` off), so the four more buckets
# cost the cold start 11 s: 52.3 s against 41.2 s with six.
# 20,480 bf16 pages of 16 tokens (40 GiB in the 8B shape; `engine_with` makes them 40,960 fp8 pages, the same
# bytes): the ShareGPT-shaped run holds at most 14,523 pages. 40,960 bf16 pages (80 GiB, the suite's before
# session 46, sized on an H200) did not fit an H100 beside the weights. The random 1024/128 load's bf16 runs hold
# about 284 sequences' pages at once where they held 568 (72 pages a sequence): not comparable with bf16 runs before.
# The 2,048-token bucket also with 512 sequence slots (``seq_buckets``: about 73 of the run's 135 such steps hold
# <= 512 rows, and their lm_head and sampler then run over 512 rows instead of 1,024), and the prefill kernel's
# programs looping over its items, at most 8 an SM of an H100's 132 (``prefill_programs``: a decode-only step then
# starts min(items, 1,056) programs that find nothing instead of one an item, 8 x (tokens / 32 + slots)): offline
# ShareGPT-shaped, fp8, on an H100, 16,038 output tok/s (median of three) against 15,878 without them, 1.010x in one
# call (seq_buckets alone 1.009x: prefill_programs' share is within the spread); load and warm-up from an empty cache
# 36.4 s against 30.6 s (three more executables) (``gpu_suite_h200.md``, thirty-eighth session). Compare an older
# tree (ab_offline's "tree") with both named: its ENGINE has neither.
ENGINE = dict(page_size=16, num_pages=20480, max_num_seqs=1024, max_num_batched_tokens=2048, max_model_len=2048,
              token_buckets=[16, 64, 128, 192, 256, 384, 512, 768, 1024, 2048], page_buckets=[128],
              seq_buckets=[[2048, 512]], prefill_programs=1056)


KV_BYTES = {"auto": 2, "fp8": 1, "fp8_e4m3": 1}     # a KV value's bytes by kv_cache_dtype (the suite's models: bf16)


def engine_with(base: dict, overrides: dict) -> dict:
    """``base`` (an engine of the suite's) with ``overrides`` over it. Where these change the token buckets, the
    token budget or the sequence slots and say nothing of ``seq_buckets``, base's pairs that the new buckets cannot
    have (a token bucket not among them, or no fewer slots than its own, ``min(tokens, max_num_seqs)``) are dropped:
    ``{"max_num_seqs": 256}`` runs without the 2,048 bucket's 512 slots instead of failing on them. A named
    ``seq_buckets`` is kept as given (the runner refuses a pair it cannot have, naming the field); ``null`` is
    ``[]``, none. Overrides that change ``kv_cache_dtype`` and name no ``num_pages`` keep the pool's bytes: base's
    pages scaled by the values' sizes (bf16's 20,480 are 40,960 fp8 pages)."""
    out = {**base, **overrides}
    if "kv_cache_dtype" in overrides and "num_pages" not in overrides and base.get("num_pages"):
        before, after = (KV_BYTES.get(base.get("kv_cache_dtype", "auto")), KV_BYTES.get(out["kv_cache_dtype"]))
        if before and after:        # the pool keeps its bytes (an unknown dtype: the engine names it)
            out["num_pages"] = base["num_pages"] * before // after
    try:
        out["seq_buckets"] = [[t, n] for t, n in out.get("seq_buckets") or []]
    except (TypeError, ValueError):
        raise ValueError(f"seq_buckets: expected (tokens, sequence slots) pairs, got {out['seq_buckets']!r}") from None
    resized = any(k in overrides for k in ("token_buckets", "max_num_batched_tokens", "max_num_seqs"))
    if resized and "seq_buckets" not in overrides and out["seq_buckets"]:
        from jaxdyn.engine.buckets import seq_bucket_fits, token_buckets_for     # no JAX: the driver imports this
        tokens = token_buckets_for(out.get("token_buckets"), out["max_num_batched_tokens"])
        slots = out["max_num_seqs"]
        out["seq_buckets"] = [[t, n] for t, n in out["seq_buckets"] if seq_bucket_fits(t, n, tokens, slots)]
    return out


# The plan's device calls (each under 600 s with the probe): the engine sections share one machine (offline
# loads the server's compiled steps), the model-step and kernel sections the other.
CALLS = (("serve", "offline"), ("host", "step", "kernels", "ceiling"))
SERVER_ENV = {"XLA_CLIENT_MEM_FRACTION": "0.85"}   # JAX's name (with the deprecated one beside it JAX refuses both)
PLAN_ENV = {"JAX_COMPILATION_CACHE_DIR": "{scratch}/jax_cache", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **SERVER_ENV}


# Client processes of the rate-inf runs: one ``bench serve`` process parses a bounded number of streamed chunks a
# second (the ceiling section measured 14,810 tok/s with one on the H200's host, before its requests were
# spread over 16 connection pools; on 2 CPUs, 1,000 streams, one process now reads 0.65x of what a raw socket
# client reads from the same server, ``python -m benchmarks.serve_stack``), which would cap the served figures.
CLIENTS = 4


def serve_runs(quick: bool) -> list[dict]:
    """Issue 10's serving runs: random 1024/128 and prefix-heavy, 1,000 prompts each at rate inf; the
    ShareGPT-shaped dataset (the published anchors' workload) at rate inf and at 4 req/s."""
    if quick:
        return [dict(label="random 1024/128, rate inf", dataset="random", num_prompts=64, input_len=1024,
                     output_len=128, request_rate="inf", num_warmups=2)]
    return [dict(label="random 1024/128, rate inf", dataset="random", num_prompts=1000, input_len=1024,
                 output_len=128, request_rate="inf", num_warmups=2, num_clients=CLIENTS),
            dict(label="sharegpt-lengths, rate inf", dataset="sharegpt-lengths", num_prompts=1000,
                 request_rate="inf", num_clients=CLIENTS),
            dict(label="sharegpt-lengths, 4 req/s", dataset="sharegpt-lengths", num_prompts=120, request_rate="4"),
            dict(label="prefix 960+64/128, rate inf", dataset="prefix", num_prompts=1000, prefix_len=960,
                 suffix_len=64, num_prefixes=4, output_len=128, request_rate="inf", num_clients=CLIENTS)]


# The server's engine loop runs in its own process (``jaxdyn serve``'s default); the rate-inf ShareGPT-shaped and
# prefix loads against the engine on a thread of the server's process, in the same call, show what the split
# is worth.
COMPARE = dict(label="engine on a thread", args=["--no-engine-process"], reserve_s=100)


def offline_datasets(quick: bool, num_prompts: int) -> list[dict]:
    sets = [dict(dataset="random", num_prompts=num_prompts, input_len=1024, output_len=128, num_warmups=4)]
    if not quick:
        sets += [dict(dataset="sharegpt-lengths", num_prompts=num_prompts, num_warmups=4, whole_steps=True),
                 # the reply shape of the figures before 2026-12-03 (lognormal, assumed), for comparison
                 dict(dataset="sharegpt-lengths", sharegpt_replies="lognormal", num_prompts=num_prompts,
                      num_warmups=4),
                 dict(dataset="prefix", num_prompts=num_prompts, prefix_len=960, suffix_len=64, num_prefixes=4,
                      output_len=128, num_warmups=4)]
    return sets


def step_models(quick: bool, model: str, full_grid: bool) -> list[dict]:
    """The step section's points: the 8B shape at issue 10's grid (batch 1/8/64/256 x context 512/2048), or
    with ``--full-grid`` the 1B shape's grid too (about 5 minutes more: run it alone)."""
    if quick:
        return [dict(name=model, batches=[1, 64], contexts=[2048], budget_s=60)]
    grid = [dict(name=model, batches=[1, 8, 64, 256], contexts=[512, 2048], budget_s=150)]
    if full_grid:
        grid.insert(0, dict(name="llama-3.2-1b", batches=[1, 8, 64, 256], contexts=[512, 2048], budget_s=150))
    return grid


def plan(quick: bool = False, model: str = "llama-3.1-8b", offline_prompts: int | None = None,
         full_grid: bool = False, datasets: list[str] | None = None, quant: str | None = None,
         kv_cache_dtype: str = "auto", quantize_lm_head: bool = False) -> suite.Plan:
    """The GPU plan; budgets sum to 690 s with the probe (425 s with ``quick``): more than one device call's
    600 s, so run it as two calls (``--sections serve,offline`` and ``--sections step,host,kernels``).
    ``quant`` ("fp8", "int8"): the serve, offline and host sections' model quantized; ``kv_cache_dtype`` ("fp8"):
    their engines' KV cache in fp8; ``quantize_lm_head`` (with ``quant`` "fp8"): their lm_head in fp8 too."""
    engine = ENGINE if kv_cache_dtype == "auto" else engine_with(ENGINE, dict(kv_cache_dtype=kv_cache_dtype))
    runs, sets = serve_runs(quick), offline_datasets(quick, offline_prompts or (100 if quick else 1000))
    if datasets:          # --datasets: a shorter call (no compared server)
        runs = [r for r in runs if r["dataset"] in datasets]
        sets = [d for d in sets if d["dataset"] in datasets]
    # the loads run again against the compared server and the tiny model
    ceiling_runs = [r for r in runs if r["request_rate"] == "inf" and r["dataset"] != "random"]
    compare = None if quick or datasets else dict(COMPARE, runs=ceiling_runs)
    host_engine = engine_with(engine, dict(num_pages=16384, max_num_seqs=256, token_buckets=[16, 64, 256, 2048],
                                           enable_prefix_caching=False))
    plan = suite.Plan(
        name="gpu" + (" (quick)" if quick else "") + (f" ({quant} model{', fp8 lm_head' if quantize_lm_head else ''})"
                                                       if quant else "") + (
            f" ({kv_cache_dtype} KV cache)" if kv_cache_dtype != "auto" else ""),
        entry="benchmarks.gpu.gpu", expect_platform="gpu",
        env=PLAN_ENV, datasheets=DATASHEETS, probe_budget_s=30, calls=CALLS,
        notes=("Model shapes with random bf16 weights (`--load-format dummy`); the engine sections load the preset "
               "with a word-level tokenizer over its whole vocabulary (exact prompt lengths, one streamed chunk "
               "per token). Published anchors ran real weights on ShareGPT: their ratios place us, they do not "
               "rank.",) + ((f"The serve, offline and host sections' model is quantized ({quant}: random weights "
                             "as `jaxdyn convert --quant` lays them out); the published anchors ran bf16.",)
                            if quant else ()) + ((f"The serve, offline and host sections' KV cache is "
                                                  f"{kv_cache_dtype} (`--kv-cache-dtype`).",)
                                                 if kv_cache_dtype != "auto" else ()),
        sections=(
            suite.serve_section(180 if quick else 370, model=model, engine=engine, runs=runs,
                                ready_timeout_s=170, warm_reserve_s=40, server_env=SERVER_ENV, compare=compare,
                                quant=quant, quantize_lm_head=quantize_lm_head),
            suite.offline_section(60 if quick else 140, model=model, engine=engine, datasets=sets, quant=quant,
                                  quantize_lm_head=quantize_lm_head),
            suite.host_section(45 if quick else 50, model=model, engine=host_engine,
                               batches=[64] if quick else [64, 256], prompt_len=512, max_tokens=1024, steps=30,
                               quant=quant, quantize_lm_head=quantize_lm_head),
            suite.step_section(step_models(quick, model, full_grid), bandwidth_gib=4.0, matmul_n=8192),
            suite.kernels_section(["--quick", "--sweep", "none"], 50),
        ) + ((
            # the same server and client on the tiny model (its steps cost next to nothing): the output tok/s
            # the HTTP process, the engine loop's host work and the client carry, beside the 8B served runs
            suite.serve_section(100, model="tiny", engine=ENGINE, runs=ceiling_runs, ready_timeout_s=60,
                                warm_reserve_s=0, server_env=SERVER_ENV, warm_start=False, ceiling=True),) if ceiling_runs
            else ()))
    names = {sec.name for sec in plan.sections}      # the calls name only the sections this plan has
    return dataclasses.replace(plan, calls=tuple(tuple(n for n in g if n in names) for g in plan.calls))


def main(argv=None) -> int:
    return suite.main(argv, plan_factory=plan, entry="benchmarks.gpu.gpu", dry_first="kernels")


if __name__ == "__main__":
    sys.exit(main())
