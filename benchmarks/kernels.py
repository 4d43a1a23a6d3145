"""Paged-attention kernels against the GPU's limits, the jax.numpy reference and JAX's bundled op.

One run (one device call) does, on the default device:

1. the two ceilings: HBM bandwidth (a donated in-place ``x + 1`` over 4 GiB,
   bytes read + written) and the bf16 matmul rate (8192^3 ``jnp.dot``);
2. correctness of both kernels against the reference on random bf16 inputs:
   ragged lengths that are not multiples of the page size, shuffled page
   tables, lengths 1 and maximal, sliding window, mixed prefill + decode steps;
   relative error ||out - ref|| / ||ref|| and a NaN check;
3. a block-size sweep of the decode kernel at two grid points (the winner is
   used for the grid and printed, to be kept in ``TUNED_DECODE_BLOCKS``);
4. the decode grid: batch x context x head_dim, 32 query / 8 kv heads; per point
   the time, KV bytes read per second, its ratio to the measured bandwidth, and
   the speed-up over the reference and over
   ``jax.experimental.pallas.ops.gpu.paged_attention``;
5. prefill of 2048-token chunks (fresh, and after a cached 2048-token prefix):
   attention FLOP rate and its ratio to the measured matmul rate.

Each timed call rotates over several page tables drawn from a pool larger
than the L2 cache, so repeated calls do not read KV out of the cache.

    python -m benchmarks.kernels [--out benchmarks/results/kernels_h100.md] [--quick] [--sweep none|small|full]
    jaxdyn bench kernels [...]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import platform
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import paged_decode, ragged_prefill
from pallas_kernels.ragged_paged_attention import (decode_part, prefill_part, ragged_paged_attention,
                                                   ragged_paged_attention_reference)

PAGE = 16
Q_HEADS, KV_HEADS = 32, 8
ROTATE = 8                         # page tables per timed call
LONG = 5                           # calls of the long timed jit per call of the short one
TRACED_POINT = 1 << 14             # batch x context up to which a decode call is timed from a trace
TRACED_RUNS = 5                    # traced runs of the ROTATE-call jit
INTERPRET = jax.default_backend() != "gpu"   # CPU: a dry run through Pallas interpret mode
# the KV pages' dtype (``--kv-dtype``): bf16, or fp8 (float8_e4m3fn, as ``--kv-cache-dtype fp8`` stores them)
KV_DTYPE = jnp.dtype(jnp.bfloat16)
L2_BYTES = 64 << 20
MAX_DECODE_CHUNKS = 8              # --decode-chunks' largest (the kernel's merge is unrolled over the chunks)


# ----------------------------------------------------------------------------- timing

def _median_time(fn, *args, reps: int = 7) -> float:
    """Median wall seconds of ``fn(*args)`` (already compiled), synchronised."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a donated in-place x + 1 (read + write)."""
    n = int(gib * (1 << 30)) // 4
    x = jnp.zeros((n,), jnp.float32) + 1.0
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    for _ in range(3):
        x = f(x)
    jax.block_until_ready(x)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        x = f(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / float(np.median(times))


def measure_matmul(n: int = 8192) -> float:
    """FLOP/s of a bf16 n^3 matmul on random data."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    return 2 * n ** 3 / _median_time(f, a, b, reps=20)


# ----------------------------------------------------------------------------- inputs

def _kv_pool(num_pages: int, head_dim: int, seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    shape = (KV_HEADS, num_pages, PAGE, head_dim)
    return (jax.random.normal(k1, shape, jnp.bfloat16).astype(KV_DTYPE),
            jax.random.normal(k2, shape, jnp.bfloat16).astype(KV_DTYPE))


def _page_tables(rng, num_pages: int, count: int, batch: int, pages_per_seq: int) -> np.ndarray:
    """i32[count, batch, pages_per_seq]: distinct shuffled pages while the pool lasts."""
    need = count * batch * pages_per_seq
    ids = np.concatenate([rng.permutation(num_pages) for _ in range(-(-need // num_pages))])
    return ids[:need].reshape(count, batch, pages_per_seq).astype(np.int32)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# ----------------------------------------------------------------------------- correctness

def check_correctness(rng) -> list[dict]:
    rows = []
    cases = [
        # name, head_dim, (cached, new) per sequence, window
        ("decode ragged lens", 128, [(0, 1), (16, 1), (4095, 1), (37, 1), (1000, 1), (2047, 1)], None),
        ("decode head_dim 64", 64, [(5, 1), (300, 1), (8191, 1)], None),
        ("decode sliding window", 128, [(700, 1), (33, 1), (2000, 1)], 256),
        ("mixed prefill + decode", 128, [(0, 2048), (100, 1), (513, 300), (2000, 1), (0, 7)], None),
        ("prefill after prefix, hd 64", 64, [(1999, 517), (0, 1), (16, 16)], None),
        ("prefill sliding window", 128, [(0, 1200), (480, 100)], 333),
    ]
    if INTERPRET:   # toy lengths for the CPU dry run
        cases = [(n, d, [(c // 32, max(1, k // 32) if k > 1 else 1) for c, k in sq], w and max(4, w // 32))
                 for n, d, sq, w in cases]
    for name, head_dim, seqs, window in cases:
        max_len = max(c + n for c, n in seqs)
        pages_per_seq = 1 << int(np.ceil(np.log2(-(-max_len // PAGE))))
        num_pages = len(seqs) * pages_per_seq + 11
        k_pages, v_pages = _kv_pool(num_pages, head_dim, seed=len(rows))
        page_table = rng.permutation(num_pages)[:len(seqs) * pages_per_seq].reshape(len(seqs), -1)
        num_tokens = sum(n for _, n in seqs)
        padded = 1 << int(np.ceil(np.log2(num_tokens + 1)))
        q = jax.random.normal(jax.random.key(100 + len(rows)), (padded, Q_HEADS, head_dim), jnp.bfloat16)
        kv_lens = np.array([c + n for c, n in seqs] + [0], np.int32)
        cu = np.concatenate([[0], np.cumsum([n for _, n in seqs]), [num_tokens]]).astype(np.int32)
        page_table = np.concatenate([page_table, np.zeros((1, pages_per_seq), np.int64)]).astype(np.int32)
        args = (q, k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu))
        kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window)
        out = jax.jit(functools.partial(ragged_paged_attention, impl="interpret" if INTERPRET else "kernel", **kw))(*args)
        ref = jax.jit(functools.partial(ragged_paged_attention_reference, **kw))(
            q.astype(jnp.float32), k_pages.astype(jnp.float32), v_pages.astype(jnp.float32), *args[3:])
        out = np.asarray(out.astype(jnp.float32))
        rows.append(dict(case=name, head_dim=head_dim, seqs=len(seqs), max_len=max_len,
                         rel_err=rel_err(out[:num_tokens], ref[:num_tokens]),
                         nan=bool(np.isnan(out).any()),
                         padding_zero=bool(np.all(out[num_tokens:] == 0))))
    return rows


# ----------------------------------------------------------------------------- decode

def _decode_inputs(rng, batch: int, context: int, head_dim: int):
    pages_per_seq = context // PAGE
    live = batch * pages_per_seq
    # enough pages that ROTATE calls touch more than the L2 holds, up to 4x the live set
    bytes_per_page = 2 * KV_HEADS * PAGE * head_dim * KV_DTYPE.itemsize
    num_pages = max(live, min(ROTATE * live, live * max(1, (4 * L2_BYTES) // (live * bytes_per_page))))
    k_pages, v_pages = _kv_pool(num_pages, head_dim, seed=batch * 7 + context)
    tables = jnp.asarray(_page_tables(rng, num_pages, ROTATE * LONG, batch, pages_per_seq))
    q = jax.random.normal(jax.random.key(1), (batch, Q_HEADS, head_dim), jnp.bfloat16)
    lens = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, lens, tables


def _rotating(attn, repeats: int = 1):
    """jit of ``repeats`` x ROTATE calls of ``attn``, each with its own page table (identical
    calls would be merged by XLA); returns every call's output (no op of its own between calls)."""
    def run(q, k_pages, v_pages, lens, tables):
        return tuple(attn(q, k_pages, v_pages, lens, tables[r * ROTATE + i])
                     for r in range(repeats) for i in range(ROTATE))
    return jax.jit(run)


def _ours(blocks=None):
    def attn(q, k_pages, v_pages, lens, table):
        return paged_decode.paged_decode_attention_kernel(
            q, k_pages, v_pages, lens, table, sm_scale=q.shape[-1] ** -0.5, blocks=blocks,
            interpret=INTERPRET)
    return attn


def _bundled(q, k_pages, v_pages, lens, table):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    k_splits = min(16, table.shape[1])
    return paged_attention(q, k_pages, v_pages, table, lens, k_splits=k_splits,
                           pages_per_compute_block=min(8, table.shape[1] // k_splits),
                           interpret=INTERPRET)


def _reference(q, k_pages, v_pages, lens, table):
    return paged_decode.paged_decode_attention_reference(
        q, k_pages, v_pages, lens, table, sm_scale=q.shape[-1] ** -0.5)


def time_per_call(fn, inputs, difference: bool = True) -> float:
    """Seconds per call of ``fn(q, k_pages, v_pages, lens, table)``, ROTATE calls a jit.

    With ``difference``: device time back to back, the time of ROTATE calls taken from that of
    LONG x ROTATE ((t_long - t_short) / ((LONG - 1) x ROTATE)), so the fixed cost of dispatching
    a jit and waiting for it (tens of µs, which a model step pays once for all its layers) drops
    out; without it, the short jit's wall time / ROTATE (for ranking variants, which all pay the
    same fixed cost)."""
    short = _median_time(_rotating(fn), *inputs)
    if not difference or INTERPRET:
        return short / ROTATE
    long = _median_time(_rotating(fn, LONG), *inputs)
    return max(long - short, 1e-9) / ((LONG - 1) * ROTATE)


def traced_time_per_call(fn, inputs) -> float:
    """Seconds of GPU kernel time per call of ``fn``, from a profiler trace of TRACED_RUNS runs
    of the ROTATE-call jit (every kernel of the call counted, the gaps between kernels not: in a
    model step they are ~0). For calls of a few µs, where the difference of two wall times is
    within the host's jitter (measured on an H200: the same batch-1 point read 9.1 and 13.2 µs in
    two runs, and the bundled op 15.4 and 8.2 µs)."""
    if INTERPRET:
        return time_per_call(fn, inputs, difference=False)
    from benchmarks.gpu.profile_step import kernel_events
    jitted = _rotating(fn)
    jax.block_until_ready(jitted(*inputs))
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(TRACED_RUNS):
            jax.block_until_ready(jitted(*inputs))
    busy_us = sum(dur for _, dur, _ in kernel_events(trace_dir))
    shutil.rmtree(trace_dir, ignore_errors=True)
    return busy_us * 1e-6 / (TRACED_RUNS * ROTATE)


def decode_time_per_call(fn, inputs, batch: int, context: int) -> float:
    """The grid's timing of a decode point: ``traced_time_per_call`` up to TRACED_POINT
    (batch x context), ``time_per_call`` above."""
    if batch * context <= TRACED_POINT:
        return traced_time_per_call(fn, inputs)
    return time_per_call(fn, inputs)


def sweep_decode_blocks(rng, points, full: bool = False, variants=None, head_dim: int = 128
                        ) -> tuple[paged_decode.DecodeBlockSizes, list[dict]]:
    """Time block sizes x split policies; the winner has the least sum of time / best time."""
    rows = []
    if variants is None and full:
        variants = [paged_decode.DecodeBlockSizes(p, w, s, t, gather=g)
                    for p, w, s in ((4, 4, 2), (4, 4, 3), (4, 4, 4), (8, 4, 3), (8, 8, 2), (8, 8, 3))
                    for t in (132, 264, 528) for g in ("pages", "rows")]
    elif variants is None:   # around the tuned entry; keys by row (by page lost at every point, H200)
        variants = [paged_decode.DecodeBlockSizes(p, w, s, t, gather="rows")
                    for p, w, s, t in ((8, 4, 3, 132), (4, 4, 3, 264), (8, 8, 3, 264), (4, 4, 4, 528),
                                       (16, 8, 2, 132), (2, 4, 6, 528), (8, 4, 3, 528), (4, 4, 3, 1056))]
    if INTERPRET:
        variants = variants[:2]
    inputs = {pt: _decode_inputs(rng, *pt, head_dim) for pt in points}
    keys = [f"b{pt[0]}_c{pt[1]}_us" for pt in points]
    for v in variants:
        row = dict(pages_per_block=v.pages_per_block, num_warps=v.num_warps,
                   num_stages=v.num_stages, min_programs=v.min_programs,
                   gather=v.gather if v.fp8_products == "off" else f"{v.gather} {v.fp8_products}")
        try:
            for pt, key in zip(points, keys):
                row[key] = time_per_call(_ours(v), inputs[pt], difference=False) * 1e6
        except Exception as e:  # a variant that does not compile (shared memory) is reported, not fatal
            print("sweep variant failed", v, repr(e)[:300], file=sys.stderr)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    fastest = {k: min(r[k] for r in ok) for k in keys}
    for r in ok:
        r["score"] = sum(r[k] / fastest[k] for k in keys) / len(keys)
    best = min(ok, key=lambda r: r["score"])
    gather, _, products = best["gather"].partition(" ")
    return paged_decode.DecodeBlockSizes(best["pages_per_block"], best["num_warps"],
                                         best["num_stages"], best["min_programs"],
                                         gather=gather, fp8_products=products or "off"), rows


def decode_grid(rng, bandwidth: float, blocks, batches, contexts, head_dims, mem_budget: float):
    rows = []
    for head_dim in head_dims:
        for context in contexts:
            for batch in batches:
                kv_bytes = batch * context * KV_HEADS * head_dim * 2 * KV_DTYPE.itemsize
                if kv_bytes > mem_budget:
                    continue
                inputs = _decode_inputs(rng, batch, context, head_dim)
                t_ours = decode_time_per_call(_ours(blocks[head_dim]), inputs, batch, context)
                t_bundled = float("nan")    # JAX's bundled op reads 16-bit pages only: none for fp8 pages
                if KV_DTYPE.itemsize == 2:
                    try:
                        t_bundled = decode_time_per_call(_bundled, inputs, batch, context)
                    except Exception as e:
                        print(f"bundled op failed at b{batch} c{context} d{head_dim}: {e}", file=sys.stderr)
                t_ref = (decode_time_per_call(_reference, inputs, batch, context) if kv_bytes * 3 < 8e9
                         else float("nan"))
                rows.append(dict(batch=batch, context=context, head_dim=head_dim, us=t_ours * 1e6,
                                 kv_gbs=kv_bytes / t_ours / 1e9, of_bw=kv_bytes / t_ours / bandwidth,
                                 vs_bundled=t_bundled / t_ours, bundled_us=t_bundled * 1e6,
                                 vs_reference=t_ref / t_ours))
                print(f"decode b={batch} c={context} d={head_dim}: {t_ours * 1e6:.1f} us, "
                      f"{rows[-1]['of_bw']:.2f} of HBM, {rows[-1]['vs_bundled']:.2f}x bundled", flush=True)
                del inputs
    return rows


# ----------------------------------------------------------------------------- prefill

def sweep_prefill_blocks(rng, chunk: int, full: bool = False, head_dim: int = 128
                         ) -> tuple[ragged_prefill.PrefillBlockSizes, list[dict]]:
    """Time the prefill kernel's block sizes on one fresh chunk and four."""
    if full:
        variants = [ragged_prefill.PrefillBlockSizes(r, p, w, s, g)
                    for r in (64, 128) for p in (2, 4, 8) for w in (4, 8) for s in (2, 3)
                    for g in ("pages", "rows")]
    else:   # around the tuned entry; keys by row (by page lost at every point, H200)
        variants = [ragged_prefill.PrefillBlockSizes(r, p, w, s, "rows")
                    for r, p, w, s in ((128, 4, 4, 3), (128, 8, 8, 3), (128, 8, 4, 2), (256, 4, 8, 2),
                                       (64, 8, 4, 3), (64, 4, 4, 3), (128, 8, 4, 3), (256, 8, 8, 2),
                                       (128, 16, 8, 2), (256, 8, 8, 3))]
    if INTERPRET:
        variants = variants[:2]
    rows = []
    for v in variants:
        row = dict(block_rows=v.block_rows, pages_per_block=v.pages_per_block,
                   num_warps=v.num_warps, num_stages=v.num_stages, gather=v.gather)
        try:
            for nseq in (1, 4):
                row[f"n{nseq}_us"] = _prefill_time(rng, head_dim, 0, chunk, nseq, v, reference=False)[0] * 1e6
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
    best = min((r for r in rows if "error" not in r), key=lambda r: r["n1_us"] + r["n4_us"])
    return ragged_prefill.PrefillBlockSizes(best["block_rows"], best["pages_per_block"],
                                            best["num_warps"], best["num_stages"],
                                            best["gather"]), rows


def prefill_inputs(rng, head_dim: int, prefix: int, chunk: int, nseq: int, count: int = ROTATE * LONG):
    """(q, k_pages, v_pages, lens, tables, cu_q_lens) of ``nseq`` chunks of ``chunk`` tokens after ``prefix``
    cached ones, with ``count`` page tables to rotate over."""
    length = prefix + chunk
    pages_per_seq = -(-length // PAGE)
    num_pages = nseq * pages_per_seq * ROTATE
    k_pages, v_pages = _kv_pool(num_pages, head_dim, seed=prefix + head_dim)
    tables = jnp.asarray(_page_tables(rng, num_pages, count, nseq, pages_per_seq))
    q = jax.random.normal(jax.random.key(3), (nseq * chunk, Q_HEADS, head_dim), jnp.bfloat16)
    lens = jnp.full((nseq,), length, jnp.int32)
    cu = jnp.arange(nseq + 1, dtype=jnp.int32) * chunk
    return q, k_pages, v_pages, lens, tables, cu


def _prefill_time(rng, head_dim, prefix, chunk, nseq, blocks, reference: bool):
    """Seconds per call of the prefill kernel (and of the reference) on nseq chunks."""
    q, k_pages, v_pages, lens, tables, cu = prefill_inputs(rng, head_dim, prefix, chunk, nseq)
    scale = head_dim ** -0.5

    def with_cu(attn):
        return lambda q, k_pages, v_pages, lens, table: attn(q, k_pages, v_pages, lens, table, cu)

    ours = functools.partial(ragged_prefill.ragged_prefill_attention_kernel, sm_scale=scale,
                             interpret=INTERPRET, blocks=blocks)
    args = (q, k_pages, v_pages, lens, tables)
    t = time_per_call(with_cu(ours), args, difference=reference)
    t_ref = float("nan")
    if reference:
        ref = functools.partial(ragged_paged_attention_reference, sm_scale=scale)
        t_ref = time_per_call(with_cu(ref), args, difference=False)
    return t, t_ref


def prefill_rows(rng, matmul_rate: float, head_dims, chunk: int = 2048,
                 blocks=None) -> list[dict]:
    """``blocks``: {head_dim: PrefillBlockSizes} (absent: the tuned table's)."""
    blocks = blocks or {}
    rows = []
    for head_dim in head_dims:
        for prefix, chunk, nseq in ((0, chunk, 1), (chunk, chunk, 1), (0, chunk, 4)):
            t, t_ref = _prefill_time(rng, head_dim, prefix, chunk, nseq, blocks.get(head_dim),
                                     reference=True)
            # causal attention FLOPs: QK^T and PV, 2 flops per multiply-add, over the keys each query sees
            keys_seen = nseq * (chunk * prefix + chunk * (chunk + 1) / 2)
            flops = 4 * Q_HEADS * head_dim * keys_seen
            rows.append(dict(head_dim=head_dim, sequences=nseq, prefix=prefix, chunk=chunk, us=t * 1e6,
                             tflops=flops / t / 1e12, of_matmul=flops / t / matmul_rate,
                             vs_reference=t_ref / t))
            print(f"prefill d={head_dim} n={nseq} prefix={prefix}: {t * 1e6:.0f} us, "
                  f"{rows[-1]['tflops']:.0f} TFLOP/s = {rows[-1]['of_matmul']:.2f} of matmul", flush=True)
    return rows


def entry_overhead(rng, blocks, points=((64, 64, 2048), (256, 256, 512), (1, 8, 2048), (8, 8, 2048)),
                   attention_programs=(0,), decode_chunks=(None,)) -> list[dict]:
    """A decode-only step through the ragged entry point (decode + prefill kernels), ``live`` of
    ``slots`` sequence slots in use (the rest padding, kv_len 0, as in a model step whose bucket
    has more sequence slots than running requests), against the decode kernel on the live
    sequences alone; the entry point once for each of ``attention_programs`` (``ragged_paged_attention``'s:
    0, a program a sequence and kv head, or that many programs looping over them) and each of ``decode_chunks``
    (its ``decode_chunks``: long contexts split into up to that many chunks; None: the tuned blocks')."""
    rows = []
    for live, slots, context in points:
        # a context (lo, hi): each sequence's drawn in [lo, hi]
        hi = context if isinstance(context, int) else context[1]
        q, k_pages, v_pages, lens, tables = _decode_inputs(rng, live, hi, 128)
        if not isinstance(context, int):
            lens = jnp.asarray(np.random.default_rng(live).integers(context[0], hi + 1, live), jnp.int32)
        pad = slots - live
        q_s = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
        lens_s = jnp.pad(lens, (0, pad))
        tables_s = jnp.pad(tables, ((0, 0), (0, pad), (0, 0)))
        cu = jnp.minimum(jnp.arange(slots + 1, dtype=jnp.int32), live)
        t_kernel = decode_time_per_call(_ours(blocks), (q, k_pages, v_pages, lens, tables), live, hi)
        kv_bytes = int(lens.sum()) * KV_HEADS * 128 * 2 * KV_DTYPE.itemsize
        label = context if isinstance(context, int) else f"{context[0]}-{context[1]}"
        # the same inputs for every program count and chunking
        for programs, chunks in itertools.product(attention_programs, decode_chunks):

            def entry(q, k_pages, v_pages, lens, table, programs=programs, chunks=chunks):
                return ragged_paged_attention(q, k_pages, v_pages, lens, table, cu,
                                              sm_scale=128 ** -0.5, attention_programs=programs,
                                              decode_chunks=chunks, impl="interpret" if INTERPRET else "kernel")
            t_entry = decode_time_per_call(entry, (q_s, k_pages, v_pages, lens_s, tables_s), slots, hi)
            decode_half, prefill_half = entry_halves(cu, programs, chunks)
            t_decode = decode_time_per_call(decode_half, (q_s, k_pages, v_pages, lens_s, tables_s), slots, hi)
            t_prefill = decode_time_per_call(prefill_half, (q_s, k_pages, v_pages, lens_s, tables_s), slots, hi)
            rows.append(dict(live=live, slots=slots, context=label, attention_programs=programs,
                             decode_chunks="tuned" if chunks is None else chunks,
                             entry_us=t_entry * 1e6, kernel_us=t_kernel * 1e6, ratio=t_entry / t_kernel,
                             entry_gbs=kv_bytes / t_entry / 1e9, decode_half_us=t_decode * 1e6,
                             prefill_half_us=t_prefill * 1e6))
            print(f"entry {live}/{slots} c={label} programs {programs} chunks {chunks}: {t_entry * 1e6:.1f} us "
                  f"(its decode kernel {t_decode * 1e6:.1f}, its prefill kernel {t_prefill * 1e6:.1f}) vs kernel "
                  f"{t_kernel * 1e6:.1f} us", flush=True)
    return rows


def entry_halves(cu_q_lens, attention_programs: int = 0, decode_chunks: int | None = None):
    """The two kernels ``ragged_paged_attention`` runs for a decode-only step (every live sequence one query
    token), each alone as the entry point calls it (``decode_part``, ``prefill_part``): (decode half, prefill half),
    each ``fn(q, k_pages, v_pages, lens, table)``. The decode half is the decode kernel over every slot (stored in
    place into zeros when the call has one context split, else the splits' partial results merged by their kernel
    into q-shaped rows); the prefill half is the prefill kernel, which finds no sequence of more than one query
    token and does nothing but start its programs: what a decode-only step pays for the ragged entry point."""
    kw = dict(interpret=INTERPRET, attention_programs=attention_programs)

    def decode_half(q, k_pages, v_pages, lens, table):
        rows = jnp.arange(lens.shape[0], dtype=jnp.int32)
        return decode_part(q, k_pages, v_pages, lens, table, rows, sm_scale=q.shape[-1] ** -0.5,
                           decode_chunks=decode_chunks, **kw)[0]

    def prefill_half(q, k_pages, v_pages, lens, table):
        return prefill_part(q, k_pages, v_pages, lens, table, cu_q_lens, sm_scale=q.shape[-1] ** -0.5,
                            out=jnp.zeros_like(q), **kw)
    return decode_half, prefill_half


# ----------------------------------------------------------------------------- report

def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "|".join("---:" for _ in cols) + "|\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, "")
            cells.append(format(v, fmt) if isinstance(v, (int, float)) and fmt else "" if v is None else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def main(argv=None, prog: str | None = None) -> str:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown report here (rewritten after every section)")
    ap.add_argument("--quick", action="store_true", help="a small grid (smoke run)")
    ap.add_argument("--sweep", choices=("none", "small", "full"), default="small",
                    help="block-size sweeps: none (use the tuned tables), small, full")
    ap.add_argument("--points", default=None,
                    help="decode grid points BxC or BxCxD[,...] (D: head_dim, default 128) instead of the full grid")
    ap.add_argument("--sweep-head-dims", default="128",
                    help="head dims whose block sizes are swept (comma-separated), each winner used for "
                         "its head_dim's grid points and prefill rows")
    ap.add_argument("--sweep-kernels", default="decode,prefill",
                    help="which kernels' block sizes are swept (decode, prefill or both)")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="the KV pages' dtype (fp8: float8_e4m3fn, what --kv-cache-dtype fp8 stores)")
    ap.add_argument("--sweep-variants", default=None, metavar="P:W:S:T:G[:F],...",
                    help="the decode sweep's variants instead of --sweep's: pages a block, warps, stages, "
                         "programs to split to, gather (rows|pages), optionally the fp8 products (off|qk|qk_pv: "
                         "DecodeBlockSizes.fp8_products), e.g. 8:4:3:264:rows,2:1:6:264:rows:qk")
    ap.add_argument("--sweep-points", default=None, metavar="BxC,...",
                    help="the decode sweep's (batch, context) points instead of the defaults")
    ap.add_argument("--entry-only", action="store_true",
                    help="the entry-point section only (decode-only steps through ragged_paged_attention)")
    ap.add_argument("--entry-points", default=None, metavar="LIVE/SLOTS/CONTEXT,...",
                    help="the entry-point section's points, e.g. 56/1024/256 (56 live sequences in a bucket of "
                         "1,024 slots) or 726/768/100-1500 (contexts drawn from 100 to 1,500)")
    ap.add_argument("--attention-programs", default="0", metavar="N,...",
                    help="the entry-point section's attention programs (ragged_paged_attention's attention_programs; "
                         "0: a program an item, N: N programs looping over the items), each measured")
    ap.add_argument("--decode-chunks", default=None, metavar="N,...",
                    help="the entry-point section's decode chunks (ragged_paged_attention's decode_chunks: long "
                         "contexts of an in-place call split into up to N chunks, N <= 8; 0 or 1: off), each "
                         "measured, with --attention-programs 0 only (persistent programs take no chunks); default: "
                         "the tuned blocks'")
    ap.add_argument("--decode-only", action="store_true",
                    help="the decode grid only (no correctness table, prefill rows or entry overhead)")
    args = ap.parse_args(argv)
    if args.out:
        from serving.bench import BenchError
        from serving.bench.report import check_writable
        try:
            check_writable(args.out)
        except BenchError as e:
            ap.error(str(e))
    try:
        programs = [int(x) for x in args.attention_programs.split(",")]
        chunks = [None] if args.decode_chunks is None else [int(x) for x in args.decode_chunks.split(",")]

        def context(c: str):
            lo, _, hi = c.partition("-")
            return (int(lo), int(hi)) if hi else int(lo)
        entry_points = None if not args.entry_points else [
            (int(a), int(b), context(c)) for a, b, c in (pt.split("/") for pt in args.entry_points.split(","))]
    except ValueError:
        ap.error(f"--attention-programs / --decode-chunks / --entry-points: expected integers (N,... and "
                 f"LIVE/SLOTS/CONTEXT,...), got {args.attention_programs!r} / {args.decode_chunks!r} / "
                 f"{args.entry_points!r}")
    if any(c is not None and not 0 <= c <= MAX_DECODE_CHUNKS for c in chunks):
        ap.error(f"--decode-chunks: each N from 0 to {MAX_DECODE_CHUNKS}")
    if args.decode_chunks is not None and any(programs):
        ap.error("--decode-chunks needs --attention-programs 0: persistent programs take no chunks")
    if any(p < 0 for p in programs) or (entry_points and any(pt[0] > pt[1] for pt in entry_points)):
        ap.error("--attention-programs must be >= 0 and --entry-points LIVE/SLOTS/CONTEXT with LIVE <= SLOTS")
    variants = None
    if args.sweep_variants:
        try:
            fields = [v.split(":") for v in args.sweep_variants.split(",")]
            if any(len(f) not in (5, 6) for f in fields):
                raise ValueError
            variants = [paged_decode.DecodeBlockSizes(int(f[0]), int(f[1]), int(f[2]), int(f[3]), gather=f[4],
                                                      fp8_products=f[5] if len(f) == 6 else "off") for f in fields]
        except ValueError:
            ap.error(f"--sweep-variants: expected P:W:S:T:G[:F] entries separated by commas, got "
                     f"{args.sweep_variants!r}")
        if any(v.gather not in ("rows", "pages") for v in variants):
            ap.error("--sweep-variants: gather must be rows or pages")
        if any(v.fp8_products not in paged_decode.FP8_PRODUCTS for v in variants):
            ap.error(f"--sweep-variants: the fp8 products must be one of {', '.join(paged_decode.FP8_PRODUCTS)}")
        if args.kv_dtype != "fp8" and any(v.fp8_products != "off" for v in variants):
            ap.error("--sweep-variants: fp8 products (qk, qk_pv) need --kv-dtype fp8")
    global KV_DTYPE
    KV_DTYPE = jnp.dtype(jnp.float8_e4m3fn if args.kv_dtype == "fp8" else jnp.bfloat16)
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    started = time.time()
    cmd = "python -m benchmarks.kernels" + (" --quick" if args.quick else "") + (
        f" --sweep {args.sweep}" if args.sweep != "small" else "") + (
        f" --points {args.points}" if args.points else "") + (
        f" --sweep-head-dims {args.sweep_head_dims}" if args.sweep_head_dims != "128" else "") + (
        f" --sweep-kernels {args.sweep_kernels}" if args.sweep_kernels != "decode,prefill" else "") + (
        f" --kv-dtype {args.kv_dtype}" if args.kv_dtype != "bf16" else "") + (
        f" --sweep-variants {args.sweep_variants}" if args.sweep_variants else "") + (
        f" --sweep-points {args.sweep_points}" if args.sweep_points else "") + (
        " --decode-only" if args.decode_only else "") + (
        " --entry-only" if args.entry_only else "") + (
        f" --entry-points {args.entry_points}" if args.entry_points else "") + (
        f" --attention-programs {args.attention_programs}" if args.attention_programs != "0" else "") + (
        f" --decode-chunks {args.decode_chunks}" if args.decode_chunks is not None else "") + (
        f" --out {args.out}" if args.out else "")
    md: list[str] = []

    def emit(*lines: str) -> None:
        """Add report lines and rewrite the report, so a run cut short keeps what it measured."""
        md.extend(lines)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(md) + "\n")

    bandwidth = measure_bandwidth(0.25 if INTERPRET else 0.5 if args.quick else 4.0)
    matmul = measure_matmul(512 if INTERPRET else 2048 if args.quick else 8192)
    print(f"HBM {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    emit(f"## Paged-attention kernels — {datetime.date.today().isoformat()}", "",
         f"Device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, Python "
         f"{platform.python_version()}. Command: `{cmd}`.", "",
         f"Measured in the same run: HBM bandwidth **{bandwidth / 1e12:.2f} TB/s** (donated in-place "
         f"`x + 1` over 4 GiB, read + write); bf16 matmul **{matmul / 1e12:.0f} TFLOP/s** (8192³).", "",
         f"Decode: {Q_HEADS} query / {KV_HEADS} kv heads, page {PAGE}, {KV_DTYPE.name} KV, every sequence at "
         f"the given context; KV bytes = batch × context × kv_heads × head_dim × 2 (K, V) × "
         f"{KV_DTYPE.itemsize} B. "
         f"Each timed call reads pages of its own shuffled page table (rotating past the L2). "
         f"Grid and prefill times are device time back to back: the wall time of {ROTATE} calls in one "
         f"jit subtracted from that of {LONG * ROTATE} (the jit's fixed dispatch cost drops out); decode "
         f"points of batch × context ≤ {TRACED_POINT}, whose calls take a few µs, are timed as GPU kernel "
         f"time from a profiler trace of {TRACED_RUNS} runs of the {ROTATE}-call jit instead (a wall-time "
         f"difference is within the host's jitter there); "
         f"sweeps rank variants by the wall time of {ROTATE} calls / {ROTATE}.", "")

    if args.entry_only:
        entry_section(rng, None, entry_points, programs, emit, chunks)
        report = "\n".join(md)
        print(report)
        return report
    correctness = [] if args.decode_only else check_correctness(rng)
    for r in correctness:
        print("correctness", r, flush=True)
    if correctness:
        emit("### Correctness (bf16 kernels vs the float32 reference on the same bf16 inputs)", "",
             _table(correctness, [("case", "case", ""), ("head_dim", "head_dim", "d"), ("seqs", "seqs", "d"),
                                  ("max_len", "max len", "d"), ("rel_err", "rel err", ".2e"),
                                  ("nan", "NaN", ""), ("padding_zero", "padding rows 0", "")]))

    if INTERPRET:   # CPU dry run: the script's logic at toy sizes
        batches, contexts, head_dims, sweep_points = (2,), (64,), (128,), [(2, 64)]
    elif args.quick:
        batches, contexts, head_dims, sweep_points = (1, 32), (512, 2048), (128,), [(32, 2048)]
    else:
        batches, contexts, head_dims = (1, 8, 32, 128), (512, 2048, 8192, 32768), (128, 64)
        sweep_points = [(1, 2048), (32, 2048), (64, 2048), (8, 8192)]

    if args.sweep_points and not INTERPRET:
        try:
            sweep_points = [tuple(int(x) for x in pt.split("x")) for pt in args.sweep_points.split(",")]
        except ValueError:
            ap.error(f"--sweep-points: expected BxC entries separated by commas, got {args.sweep_points!r}")
        if any(len(pt) != 2 for pt in sweep_points):
            ap.error("--sweep-points: expected BxC entries")
    # None: each call takes the kernel's own choice (``decode_block_sizes`` by the pages' dtype and the batch)
    best = {d: None for d in (128, 64)}
    sweep_dims = [int(d) for d in args.sweep_head_dims.split(",")]
    sweep_kernels = set(args.sweep_kernels.split(","))
    if sweep_kernels - {"decode", "prefill"}:
        ap.error("--sweep-kernels takes decode and/or prefill")
    if args.sweep != "none" and "decode" in sweep_kernels:
        for head_dim in sweep_dims:
            best[head_dim], sweep = sweep_decode_blocks(rng, sweep_points, full=args.sweep == "full",
                                                        variants=variants, head_dim=head_dim)
            print(f"decode block sweep winner (head_dim {head_dim})", best[head_dim], flush=True)
            emit(f"### Decode block-size sweep, head_dim {head_dim} (µs per call)", "",
                 _table(sweep, [("pages_per_block", "pages/block", "d"), ("num_warps", "warps", "d"),
                                ("num_stages", "stages", "d"), ("min_programs", "split to programs", "d"),
                                ("gather", "gather", ""),
                                ("score", "time / best (mean)", ".3f")]
                        + [(f"b{b}_c{c}_us", f"batch {b}, context {c}: µs", ".1f") for b, c in sweep_points]
                        + [("error", "error", "")]))
    mem_budget = 0.25 * (dev.memory_stats() or {}).get("bytes_limit", 16e9)
    if args.points:
        grid = []
        for point in args.points.split(","):
            b, c, *d = (int(x) for x in point.split("x"))
            grid += decode_grid(rng, bandwidth, best, (b,), (c,), tuple(d) or (128,), mem_budget)
    else:
        grid = decode_grid(rng, bandwidth, best, batches, contexts, head_dims, mem_budget)
    emit("### Decode", "",
         _table(grid, [("batch", "batch", "d"), ("context", "context", "d"), ("head_dim", "head_dim", "d"),
                       ("us", "µs", ".1f"), ("kv_gbs", "KV GB/s", ".0f"), ("of_bw", "of HBM bw", ".2f"),
                       ("bundled_us", "bundled µs", ".1f"), ("vs_bundled", "× bundled", ".2f"),
                       ("vs_reference", "× reference", ".2f")]),
         "Decode block sizes used: " + "; ".join(
             f"head_dim {d} " + (str(best[d]) if best[d] else "the kernel's table (`paged_decode.decode_block_sizes` "
                                 "by the pages' dtype and the call's sequence slots)") for d in (128, 64)) + ".", "")

    if args.decode_only:
        report = "\n".join(md)
        print(report)
        return report
    chunk = 64 if INTERPRET else 2048
    best_prefill = {d: ragged_prefill.prefill_block_sizes(d, PAGE) for d in (128, 64)}
    if args.sweep != "none" and "prefill" in sweep_kernels:
        for head_dim in sweep_dims:
            best_prefill[head_dim], prefill_sweep = sweep_prefill_blocks(
                rng, chunk, full=args.sweep == "full", head_dim=head_dim)
            print(f"prefill block sweep winner (head_dim {head_dim})", best_prefill[head_dim], flush=True)
            emit(f"### Prefill block-size sweep, head_dim {head_dim} (µs per call, fresh 2048-token chunks)", "",
                 _table(prefill_sweep, [("block_rows", "rows", "d"), ("pages_per_block", "pages/block", "d"),
                                        ("num_warps", "warps", "d"), ("num_stages", "stages", "d"),
                                        ("gather", "gather", ""),
                                        ("n1_us", "1 chunk µs", ".0f"), ("n4_us", "4 chunks µs", ".0f"),
                                        ("error", "error", "")]))
    prefill = prefill_rows(rng, matmul, head_dims, chunk=chunk, blocks=best_prefill)
    emit("### Prefill (ragged kernel, causal)", "",
         _table(prefill, [("head_dim", "head_dim", "d"), ("sequences", "sequences", "d"),
                          ("prefix", "cached prefix", "d"), ("chunk", "chunk", "d"), ("us", "µs", ".0f"),
                          ("tflops", "TFLOP/s", ".0f"), ("of_matmul", "of matmul", ".2f"),
                          ("vs_reference", "× reference", ".2f")]),
         f"Prefill block sizes used: head_dim 128 {best_prefill[128]}; head_dim 64 {best_prefill[64]}.", "")

    entry_section(rng, best[128], entry_points, programs, emit, chunks)
    emit(f"Whole run: {time.time() - started:.0f} s.")
    report = "\n".join(md)
    print(report)
    return report


def entry_section(rng, blocks, points, programs, emit, chunks=(None,)) -> None:
    overhead = entry_overhead(rng, blocks, points or (((2, 4, 64),) if INTERPRET else
                              ((64, 64, 2048), (256, 256, 512), (1, 8, 2048), (8, 8, 2048), (1, 16, 2048))),
                              attention_programs=programs, decode_chunks=chunks)
    emit("### Decode-only step through the ragged entry point (decode + prefill kernels) vs the decode kernel", "",
         "`live` of `slots` sequence slots hold a sequence (the rest are a bucket's padding); the decode "
         "kernel alone runs on the live sequences only; `programs`: the entry's attention programs (0: a program an "
         "item; N: N programs looping over the items); `chunks`: the decode kernel's long contexts split into up to "
         "that many chunks (`decode_chunks`; tuned: the tuned blocks'); `its decode kernel`, `its prefill kernel`: "
         "the entry's two "
         "kernels each alone as it calls them (the prefill kernel finds no prompt rows in a decode-only step).", "",
         _table(overhead, [("live", "live", "d"), ("slots", "slots", "d"), ("context", "context", "d"),
                           ("attention_programs", "programs", "d"), ("decode_chunks", "chunks", "d"),
                           ("entry_us", "entry µs", ".1f"), ("entry_gbs", "entry KV GB/s", ".0f"),
                           ("decode_half_us", "its decode kernel µs", ".1f"),
                           ("prefill_half_us", "its prefill kernel µs", ".1f"),
                           ("kernel_us", "decode kernel µs", ".1f"), ("ratio", "ratio", ".2f")]))


if __name__ == "__main__":
    main()
