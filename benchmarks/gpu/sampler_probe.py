"""What does the sampler cost, sorted or sort-free? Each variant of ``jaxdyn.engine.sampler.sample`` alone over
``M`` rows of the model's vocabulary (float32 logits, random; every row with temperature 0.8, top-k 50, top-p 0.9,
min-p 0.02, penalties and logprobs, so that ``full``'s every part runs on every row):

- ``greedy``, ``random`` (temperature alone), ``plain``: the cheap variants (``plain, no filters``: the
  temperature-only rows ``random`` serves, in ``plain``);
- ``full sort``: ``full`` as the variants' executables run it (a vocabulary sort for top-k / top-p, ``lax.top_k`` for
  the top logprobs: CUB calls on a GPU from 32 rows);
- ``full sort-free N-bit``: ``full`` sort-free (``sample(sort_free=True)``: radix searches over the logits' order
  keys and masked argmaxes, kernels a CUDA graph holds) in ``jax.numpy``, with digits of 1, 2 and 4 bits a pass
  (``pallas_kernels.sampling_thresholds.DIGIT_BITS``: 32 passes reading the row once each, 16 reading it 3 times, 8
  reading it 15 times);
- ``full sort-free kernel`` (on a GPU): the same with the thresholds from the Pallas kernel (one program a row,
  a pass reading the row once), as ``--sampler-switch`` runs it on a GPU.

    python -m benchmarks.gpu.sampler_probe [--model llama-3.1-8b] [--rows 16,64,256,1024]

prints one table: rows, ms of each form, each sort-free form / sort, and the logits' read at the copy rate (one pass); a
second of ``full``'s parts alone (its filters, top-p alone, the penalties, the top logprobs, the rank); then, per form, the compiled program's custom-call targets (a CUB sort shows as ``xla.gpu.ext.cub_sort_*``) and fusions.
Runs on the CPU too (its figures say nothing of a GPU's).
"""

from __future__ import annotations


def sampling_inputs(rows: int, vocab: int, history: int = 512):
    """(logits f32[rows, vocab], SamplingArrays with every part on, (history, valid, is_output)) of ``rows`` rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdyn.engine.sampler import SamplingArrays
    full = lambda v, dt=jnp.float32: jnp.full((rows,), v, dt)   # noqa: E731
    s = SamplingArrays(temperature=full(0.8), top_k=full(50, jnp.int32), top_p=full(0.9), min_p=full(0.02),
                       repetition_penalty=full(1.1), presence_penalty=full(0.2), frequency_penalty=full(0.2),
                       prompt_lens=full(history // 2, jnp.int32), seeds=jnp.arange(rows, dtype=jnp.uint32),
                       output_index=full(3, jnp.int32), biased=jnp.full((rows, 4), -1, jnp.int32))
    logits = jax.random.normal(jax.random.key(rows), (rows, vocab), jnp.float32) * 3
    rng = np.random.default_rng(rows)
    hist = (jnp.asarray(rng.integers(0, vocab, (rows, history)), jnp.int32), jnp.ones((rows, history), bool),
            jnp.asarray(np.arange(history)[None, :] >= history // 2).repeat(rows, 0))
    return logits, (s, hist)


def main(argv=None) -> int:
    from benchmarks.gpu.gemm_probe import probe_args
    args, rows = probe_args("python -m benchmarks.gpu.sampler_probe", "16,64,256,1024", argv)

    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.fp8_probe import print_summaries, time_forms
    from benchmarks.kernels import measure_bandwidth
    from jaxdyn.config import ModelConfig
    from jaxdyn.engine.sampler import FULL, GREEDY, PLAIN, RANDOM, sample
    from pallas_kernels import sampling_thresholds as thresholds
    from jaxdyn.models.presets import preset_config

    vocab = ModelConfig.from_dict(preset_config(args.model)).vocab_size

    def form(variant, sort_free=None, impl="auto", unfiltered=False):
        def run(logits, p):     # every output kept (one small array: a timed call waits on one)
            thresholds.IMPL = impl        # read as the form is traced
            s = p[2] if unfiltered else p[0]     # an argument, as the runner's rows are (not constants XLA folds)
            out = sample(logits, lambda: p[1], s, variant, sort_free=sort_free)
            return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in out if x is not None])
        return run

    def no_filters(s):
        return dataclasses.replace(s, top_k=jnp.zeros_like(s.top_k), top_p=jnp.ones_like(s.top_p),
                                   min_p=jnp.zeros_like(s.min_p), repetition_penalty=jnp.ones_like(s.top_p),
                                   presence_penalty=jnp.zeros_like(s.top_p), frequency_penalty=jnp.zeros_like(s.top_p))

    def with_unfiltered(params):    # (rows' arrays, history, the same rows asking for temperature alone)
        return (*params, no_filters(params[0]))

    default = thresholds.IMPL
    forms = {"greedy": form(GREEDY), "random": form(RANDOM, unfiltered=True),
             "plain, no filters": form(PLAIN, unfiltered=True), "plain": form(PLAIN),
             "full sort": form(FULL, sort_free=False), "full": form(FULL)}
    if jax.default_backend() == "gpu":      # the Pallas kernels (interpret mode would take minutes on a CPU)
        forms["full sort-free passes"] = form(FULL, True, impl="passes")
        forms["full sort-free kernel"] = form(FULL, True, impl="kernel")
    bandwidth = measure_bandwidth(2.0)
    print(f"{args.model} vocabulary {vocab}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (this process); rows with "
          "temperature 0.8, top-k 50, top-p 0.9, min-p 0.02, penalties, logprobs ('plain, no filters': temperature "
          "alone, as arguments); on a GPU 'plain' and 'full' filter with the thresholds' passes, 'full sort' with the sort", flush=True)
    names = list(forms)
    ref = names.index("full sort")
    print("| rows | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / full sort" for n in names if n != "full sort") + " | logits' read ms |")
    print("|---:|" + "---:|" * (2 * len(names)))
    summaries = {}
    for m in rows:
        logits, params = sampling_inputs(m, vocab)
        t = time_forms(forms, logits, with_unfiltered(params), args.reps, summaries)
        print(f"| {m} | " + " | ".join(f"{x * 1e3:.3f}" for x in t) + " | "
              + " | ".join(f"{x / t[ref]:.3f}" for i, x in enumerate(t) if i != ref)
              + f" | {4.0 * m * vocab / bandwidth * 1e3:.3f} |", flush=True)
    thresholds.IMPL = default
    # the parts alone: where the time goes
    from jaxdyn.engine.sampler import _top_logprobs, apply_filters, apply_filters_sort_free, apply_penalties

    def top_p_only(s):
        return dataclasses.replace(s, top_k=jnp.zeros_like(s.top_k), min_p=jnp.zeros_like(s.min_p))

    parts = {
        "filters sort (top-k, top-p, min-p)": lambda x, p: apply_filters(x / 0.8, p[0]),
        "top-p alone, sort": lambda x, p: apply_filters(x / 0.8, top_p_only(p[0])),
        "penalties": lambda x, p: apply_penalties(x, *p[1], p[0]),
        "log-softmax, top logprobs": lambda x, p: _top_logprobs(jax.nn.log_softmax(x, axis=-1))[1],
        "log-softmax, rank": lambda x, p: jnp.sum(jax.nn.log_softmax(x, axis=-1) >= x[:, :1], axis=-1),
    }
    if jax.default_backend() == "gpu":      # the thresholds alone: a pass a call, or one program a row
        parts["filters passes"] = lambda x, p: apply_filters_sort_free(x / 0.8, p[0])
        for impl in ("passes", "kernel"):
            parts[f"{impl}: top-k and top-p"] = lambda x, p, i=impl: thresholds.sampling_thresholds(
                x, p[0].top_k, p[0].top_p, impl=i)[1]
            parts[f"{impl}: top-p alone"] = lambda x, p, i=impl: thresholds.sampling_thresholds(
                x, jnp.full_like(p[0].top_k, x.shape[1]), p[0].top_p, impl=i)[1]
        def passes(top_k: bool, **options):     # the passes' cutoff with ``options``, top-k on or off (k = V)
            return lambda x, p: thresholds.sampling_thresholds_passes(
                x, p[0].top_k if top_k else jnp.full_like(p[0].top_k, x.shape[1]), p[0].top_p, **options)[1]

        # every key compared with every candidate (no tile skipped), and top-p's search over every digit (none
        # taken from its bracket): the forms before session 32
        parts["passes unskipped: top-k and top-p"] = passes(True, skip=False)
        parts["passes unskipped: top-p alone"] = passes(False, skip=False)
        parts["passes unbracketed: top-k and top-p"] = passes(True, bracket=False)
        # Triton's warps and pipeline stages a pass (4 and 1 by default): fewer registers a thread for the sums at
        # 8 warps (more programs resident), the tiles' loads ahead of their sums with stages
        for warps, stages in ((8, 1), (4, 3), (8, 3)):
            parts[f"passes {warps} warps {stages} stages: top-p alone"] = passes(False, warps=warps, stages=stages)
        parts["passes: neither"] = lambda x, p: thresholds.sampling_thresholds(
            x, jnp.where(p[2].top_k > 0, p[2].top_k, x.shape[1]), p[2].top_p, impl="passes")[1]
    print("\nthe parts alone (ms):\n")
    print("| rows | " + " | ".join(parts) + " |")
    print("|---:|" + "---:|" * len(parts))
    for m in rows:
        logits, params = sampling_inputs(m, vocab)
        t = time_forms(parts, logits, with_unfiltered(params), args.reps, summaries)
        print(f"| {m} | " + " | ".join(f"{x * 1e3:.3f}" for x in t) + " |", flush=True)
    print_summaries(summaries)
    print(f"reproduce: python -m benchmarks.gpu.sampler_probe --model {args.model} --rows {args.rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
