"""Quality of the decode attention kernel's fp8 products (``attention_fp8_products``) over fp8 KV pages.

    python benchmarks/decode_products_quality.py            # the shipped demo model, CPU (Pallas interpret mode)

Every position of a fixed set of prompts is scored as a decode step (teacher-forced: one token a sequence a step,
its keys and values written into float8_e4m3fn pages, attention over the cache by the decode kernel), the model
in bf16. Scored four ways (and a fifth, the reference with the model in float32, for the size of bf16's own
rounding): the ``jax.numpy`` reference attention (the pages widened to float32), the decode kernel
as a GPU runs it by default (the tiles widened to float16), and the kernel with ``attention_fp8_products`` "qk"
(the scores from a query quantized to e4m3 a head row) and "qk_pv" (the probabilities in e4m3 too). Reported
against the reference and against the default kernel: top-1 agreement of next-token predictions and
KL(p_ref || p) in nats per position. The kernel runs in Pallas interpret mode, the same program a GPU compiles
(its products in the same dtypes; XLA's CPU products stand in for the GPU's matrix instructions).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGE = 16


def score_decode(path: str, prompts: list[list[int]], impl: str, products: str, dtype: str = "bfloat16"
                 ) -> list[np.ndarray]:
    """Log-probabilities at every position of every prompt, each position a decode step over fp8 pages, the model
    computing in ``dtype``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxdyn.models.llama as llama
    from checkpoints.convert import load_converted
    from jaxdyn.kv.cache import AttentionMetadata, KVCacheSpec, allocate_kv_cache
    from jaxdyn.parallel.sharding import make_mesh, stored_kv_heads
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention

    mesh = make_mesh(1)
    loaded = load_converted(path, mesh, dtype=jnp.dtype(dtype))
    cfg = loaded.config
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))     # live sequences: a prefix a step
    b = len(prompts)
    per_seq = -(-max(len(p) for p in prompts) // PAGE)
    num_pages = 1 + b * per_seq            # page 0 unused; sequence s owns 1 + s * per_seq ...
    spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, 1), num_pages, PAGE, cfg.head_dim,
                       jnp.float8_e4m3fn)
    table = 1 + np.arange(b * per_seq, dtype=np.int32).reshape(b, per_seq)
    attention = functools.partial(ragged_paged_attention, impl=impl)

    @jax.jit
    def step(state, kv, ids, md):
        model = nnx.merge(loaded.graphdef, state)
        kv, hidden = model(kv, ids, md, attention_fp8_products=products)
        return kv, jax.nn.log_softmax(model.compute_logits(hidden).astype(jnp.float32), -1)

    saved = llama.ragged_paged_attention
    llama.ragged_paged_attention = attention
    try:
        kv = allocate_kv_cache(spec, mesh)
        out = [np.zeros((len(prompts[i]), cfg.vocab_size), np.float32) for i in order]
        for t in range(max(len(p) for p in prompts)):
            live = sum(len(prompts[i]) > t for i in order)
            ids = np.zeros(b, np.int32)
            ids[:live] = [prompts[i][t] for i in order[:live]]
            slot_page = np.full(b, num_pages, np.int32)          # padding rows: written nowhere
            slot_page[:live] = table[:live, t // PAGE]
            md = AttentionMetadata(
                positions=np.where(np.arange(b) < live, t, 0).astype(np.int32), slot_page=slot_page,
                slot_offset=np.full(b, t % PAGE, np.int32), page_table=table,
                kv_lens=np.where(np.arange(b) < live, t + 1, 0).astype(np.int32),
                cu_q_lens=np.minimum(np.arange(b + 1), live).astype(np.int32))
            kv, lp = step(loaded.state, kv, ids, md)
            lp = np.asarray(lp)
            for row in range(live):
                out[row][t] = lp[row]
    finally:
        llama.ragged_paged_attention = saved
    back = [None] * len(prompts)
    for row, i in enumerate(order):
        back[i] = out[row]
    return back


def compare(ref: list[np.ndarray], lps: list[np.ndarray]) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(ref || lps), p99 KL) over every position."""
    n = sum(len(a) for a in ref)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, lps)) / n
    kl = np.concatenate([(np.exp(a) * (a - b)).sum(-1) for a, b in zip(ref, lps)])
    return agree, float(kl.mean()), float(np.percentile(kl, 99))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "demo"), help="Hugging Face directory")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "benchmarks", "data", "shakespeare_held_out.json"))
    ap.add_argument("--num-prompts", type=int, default=32, help="the first N prompts of the file")
    args = ap.parse_args(argv)
    if args.num_prompts < 1:
        ap.error("--num-prompts must be at least 1")

    import jax

    from checkpoints.convert import convert
    from jaxdyn.engine.tokenizer import Tokenizer

    with open(args.prompts) as f:
        texts = json.load(f)["prompts"][:args.num_prompts]
    tok = Tokenizer.from_pretrained(args.model)
    prompts = [tok.encode(t) for t in texts]
    n_pos = sum(len(p) for p in prompts)
    runs = (("reference", "off"), ("interpret", "off"), ("interpret", "qk"), ("interpret", "qk_pv"),
            ("reference", "off", "float32"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bf16")
        convert(args.model, out, dtype="bfloat16", progress=False)
        results = {run: score_decode(out, prompts, *run) for run in runs}

    cmd = "python benchmarks/decode_products_quality.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("prompts", args.prompts),
                                                     ("num_prompts", args.num_prompts))
        if v != ap.get_default(k))
    print(f"# decode attention over fp8 KV pages: {os.path.basename(os.path.normpath(args.model))}, bf16, "
          f"{len(prompts)} prompts, {n_pos} positions each a decode step, on {jax.devices()[0].device_kind}")
    print(f"# {datetime.date.today().isoformat()}  command: {cmd}")
    print("# KL(p_ref || p) in nats per position\n")
    print("| attention | against the reference: top-1 | mean KL | p99 KL | against the default kernel: top-1 | "
          "mean KL | p99 KL |")
    print("|---|---|---|---|---|---|---|")
    names = {("reference", "off"): "reference (pages widened to float32)",
             ("interpret", "off"): "kernel, products in float16 (default)",
             ("interpret", "qk"): "kernel, `attention_fp8_products` qk",
             ("interpret", "qk_pv"): "kernel, `attention_fp8_products` qk_pv",
             ("reference", "off", "float32"): "reference, the model in float32 (the scale of bf16's rounding)"}
    for run in runs:
        a = compare(results[runs[0]], results[run])
        d = compare(results[runs[1]], results[run])
        print(f"| {names[run]} | {a[0]:.4f} | {a[1]:.2e} | {a[2]:.2e} | {d[0]:.4f} | {d[1]:.2e} | {d[2]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
