"""Quality and size of int8 (weights only) and fp8 (weights and activations) quantization against the
unquantized model.

    python benchmarks/quant_quality.py                      # the shipped demo model, CPU is fine
    python benchmarks/quant_quality.py --model DIR --prompts FILE.json

The model is converted four times with ``jaxdyn convert`` (no quantization, int8, fp8, and fp8 with its lm_head
in fp8 too: ``--quantize-lm-head``) from the same
Hugging Face directory, each conversion is restored, and every position of every prompt of a fixed set
is scored in float32 compute (``--compute-dtype``). Reported against the unquantized conversion: weight bytes (all
parameters, and the quantized linear layers alone), top-1 agreement of next-token predictions, and the
mean KL divergence KL(p_unquantized || p_quantized) in nats per position. The unquantized and fp8 models are
scored again with fp8 KV pages (``--kv-cache-dtype fp8``: the prompt's keys and values written as float8_e4m3fn
and read back by attention), against the same unquantized reference, and the fp8 model once more with its layer
inputs through ``pallas_kernels.rms_norm_fp8`` (``--fp8-fused-norm``: on a GPU the kernel, which rounds the norm's
output to the compute dtype before quantizing it where XLA's compiled unfused layers may not; elsewhere its
reference, the same as the fp8 row). ``--compute-dtype bfloat16`` scores every model in bf16, as a bf16 checkpoint
is served.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the decoder's linear layers, every quantization's ("bytes (quantized linears)"; an fp8 lm_head is counted with
# the rest)
DECODER_LINEARS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def score(path: str, prompts: list[list[int]], kv_dtype=None, *, compute_dtype: str = "float32",
          fused_norm: bool = False) -> tuple[list[np.ndarray], int, int]:
    """Log-probabilities at every position of every prompt, weight bytes as served (all, quantized linears).
    ``compute_dtype``: the restored model's dtype (its activations'); ``fused_norm``: an fp8 model's layer inputs
    through ``pallas_kernels.rms_norm_fp8`` (``fp8_fused_norm``; the kernel on a GPU, its reference elsewhere)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from checkpoints.convert import load_converted
    from jaxdyn.kv.cache import AttentionMetadata, KVCacheSpec, allocate_kv_cache
    from jaxdyn.parallel.sharding import make_mesh, stored_kv_heads

    mesh = make_mesh(1)
    loaded = load_converted(path, mesh, dtype=jnp.dtype(compute_dtype))
    cfg = loaded.config
    page = 16
    longest = max(len(p) for p in prompts)
    n_pages = -(-longest // page)
    spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, 1), n_pages + 1, page, cfg.head_dim,
                       kv_dtype or jnp.dtype(compute_dtype))

    @jax.jit
    def forward(state, kv, ids, md):
        model = nnx.merge(loaded.graphdef, state)
        kv, hidden = model(kv, ids, md, fp8_fused_norm=fused_norm)
        return jax.nn.log_softmax(model.compute_logits(hidden).astype(jnp.float32), -1)

    out = []
    for ids in prompts:
        n = len(ids)
        pages = np.arange(1, n_pages + 1, dtype=np.int32)
        pos = np.arange(n, dtype=np.int32)
        md = AttentionMetadata(positions=pos, slot_page=pages[pos // page], slot_offset=pos % page,
                               page_table=pages[None], kv_lens=np.array([n], np.int32),
                               cu_q_lens=np.array([0, n], np.int32))
        out.append(np.asarray(forward(loaded.state, allocate_kv_cache(spec, mesh), np.asarray(ids, np.int32), md)))
    # Bytes as served: restored again in the checkpoint's own dtype (bf16 by default), not the f32 of scoring.
    served = load_converted(path, mesh)
    total = 0
    linear = 0
    for p, leaf in jax.tree_util.tree_flatten_with_path(served.state)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in p]
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        if any(k in DECODER_LINEARS for k in keys):
            linear += nbytes
    return out, total, linear


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "demo"), help="Hugging Face directory")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "benchmarks", "data", "shakespeare_held_out.json"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="storage dtype of the unquantized conversion and of the scales")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype every model is scored in (bfloat16: as the engine serves a bf16 checkpoint, the "
                    "fp8 layers' inputs rounded to bf16 where the model rounds them)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from checkpoints.convert import convert
    from jaxdyn.engine.tokenizer import Tokenizer

    with open(args.prompts) as f:
        texts = json.load(f)["prompts"]
    tok = Tokenizer.from_pretrained(args.model)
    prompts = [tok.encode(t) for t in texts]
    n_pos = sum(len(p) for p in prompts)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in (None, "int8", "fp8"):
            out = os.path.join(tmp, quant or "none")
            convert(args.model, out, dtype=args.dtype, quant=quant, progress=False)
            results[quant] = score(out, prompts, compute_dtype=args.compute_dtype)
            if quant in (None, "fp8"):
                results[(quant, "kv")] = score(out, prompts, jnp.float8_e4m3fn, compute_dtype=args.compute_dtype)
            if quant == "fp8":
                results[("fp8", "fused")] = score(out, prompts, compute_dtype=args.compute_dtype, fused_norm=True)
        out = os.path.join(tmp, "fp8-head")
        convert(args.model, out, dtype=args.dtype, quant="fp8", quantize_lm_head=True, progress=False)
        results[("fp8", "head")] = score(out, prompts, compute_dtype=args.compute_dtype)

    ref, ref_bytes, ref_linear = results[None]
    rows = [("none", ref_bytes, ref_linear, 1.0, 0.0, 0.0)]
    names = {"int8": "int8", "fp8": "fp8", (None, "kv"): "none, fp8 KV", ("fp8", "kv"): "fp8, fp8 KV",
             ("fp8", "head"): "fp8, fp8 lm_head", ("fp8", "fused"): "fp8, fused norms (fp8_fused_norm)"}
    for quant in ("int8", "fp8", ("fp8", "fused"), (None, "kv"), ("fp8", "kv"), ("fp8", "head")):
        lps, nbytes, linear = results[quant]
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, lps)) / n_pos
        kl = [(np.exp(a) * (a - b)).sum(-1) for a, b in zip(ref, lps)]
        kl_all = np.concatenate(kl)
        rows.append((names[quant], nbytes, linear, agree, float(kl_all.mean()), float(np.percentile(kl_all, 99))))

    cmd = "python benchmarks/quant_quality.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("prompts", args.prompts),
                                                     ("dtype", args.dtype), ("compute_dtype", args.compute_dtype))
        if v != ap.get_default(k))
    print(f"# quantization quality (int8: weights only; fp8: weights and activations): {os.path.basename(os.path.normpath(args.model))}, "
          f"{len(prompts)} prompts, {n_pos} positions, {args.compute_dtype} compute on {jax.devices()[0].device_kind}")
    print(f"# {datetime.date.today().isoformat()}  command: {cmd}")
    print(f"# unquantized = {args.dtype} weights; KL(p_unquantized || p_quantized) in nats per position\n")
    print("| weights | bytes (all) | ratio to unquantized | bytes (quantized linears) | ratio | "
          "top-1 agreement | mean KL | p99 KL |")
    print("|---|---|---|---|---|---|---|---|")
    for name, nbytes, linear, agree, kl, kl99 in rows:
        print(f"| {name} | {nbytes:,} | {nbytes / ref_bytes:.3f} | {linear:,} | {linear / ref_linear:.3f} | "
              f"{agree:.4f} | {kl:.2e} | {kl99:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
