"""Run one attention kernel a few times at one point, for a profiler to look at (ncu, XLA dumps).

Nothing is timed here: the point is a process whose only GPU work is the kernel, e.g.

    ncu --clock-control none -k regex:paged_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python -m benchmarks.gpu.kernel_once --kernel decode --batch 64 --context 2048 --gather rows
    XLA_FLAGS=--xla_dump_to=DIR python -m benchmarks.gpu.kernel_once ...   # PTX of the kernel
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import PAGE, Q_HEADS, _decode_inputs, _kv_pool, _page_tables
from pallas_kernels import paged_decode, ragged_prefill


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--batch", type=int, default=64, help="sequences (decode) or chunks (prefill)")
    ap.add_argument("--context", type=int, default=2048, help="context (decode) or chunk (prefill)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gather", choices=("pages", "rows"), default="pages")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    interpret = jax.default_backend() != "gpu"   # CPU: a dry run
    if args.kernel == "decode":
        tuned = paged_decode.decode_block_sizes(args.head_dim, PAGE)
        blocks = paged_decode.DecodeBlockSizes(tuned.pages_per_block, tuned.num_warps,
                                               tuned.num_stages, tuned.min_programs, args.gather)
        q, k_pages, v_pages, lens, tables = _decode_inputs(rng, args.batch, args.context, args.head_dim)
        for i in range(args.calls):
            out = paged_decode.paged_decode_attention_kernel(
                q, k_pages, v_pages, lens, tables[i % tables.shape[0]],
                sm_scale=args.head_dim ** -0.5, blocks=blocks, interpret=interpret)
    else:
        tuned = ragged_prefill.prefill_block_sizes(args.head_dim, PAGE)
        blocks = ragged_prefill.PrefillBlockSizes(tuned.block_rows, tuned.pages_per_block,
                                                  tuned.num_warps, tuned.num_stages, args.gather)
        chunk, nseq = args.context, args.batch
        pages_per_seq = chunk // PAGE
        k_pages, v_pages = _kv_pool(nseq * pages_per_seq * 2, args.head_dim, seed=0)
        table = jnp.asarray(_page_tables(rng, nseq * pages_per_seq * 2, 1, nseq, pages_per_seq)[0])
        q = jax.random.normal(jax.random.key(3), (nseq * chunk, Q_HEADS, args.head_dim), jnp.bfloat16)
        lens = jnp.full((nseq,), chunk, jnp.int32)
        cu = jnp.arange(nseq + 1, dtype=jnp.int32) * chunk
        for _ in range(args.calls):
            out = ragged_prefill.ragged_prefill_attention_kernel(
                q, k_pages, v_pages, lens, table, cu, sm_scale=args.head_dim ** -0.5, blocks=blocks, interpret=interpret)
    jax.block_until_ready(out)
    print(f"{args.kernel} b{args.batch} c{args.context} d{args.head_dim} {blocks}: "
          f"{args.calls} calls done", flush=True)


if __name__ == "__main__":
    main()
