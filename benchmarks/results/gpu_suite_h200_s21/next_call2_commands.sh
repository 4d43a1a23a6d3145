# For the next device session's second call (written in the twenty-first session, which was lent no device; it
# replaces session 20's next_call2_commands.sh, in git history; at most ~570 s by its limits). The engine offline (fp8 w8a8,
# fp8 KV pages, 1,000 ShareGPT-shaped prompts), each configuration from its own empty JAX cache, so that its first
# run's load seconds are its cold start (round 0) and its second run is warm (round 1):
#   - the tree as committed (the in-place attention output's zeros a kernel, kernel_zeros);
#   - the same with those zeros a jnp.zeros_like again (attention_memset.patch): a memset a layer, which XLA's
#     CUDA graphs cannot hold, so each one ends the step's graph;
#   - --sampler-switch (one executable a bucket, the sampler variant a lax.switch on the device): its cold start
#     should fall toward --separate-sampler's 37-51 s, with one call a step.
# Each run prints its warm-up's compilation (executables, threads, wall, XLA's seconds summed, the slowest).
# Copy $OUT's files into gpu_suite_h200_s22/ (prefixed callN_).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
R=$PWD; mkdir -p /tmp/memset && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/memset/ \
  && (cd /tmp/memset && patch -p1 < $R/benchmarks/results/gpu_suite_h200_s21/attention_memset.patch) | tail -1
# the switch's full branch takes its thresholds from a Pallas kernel never compiled on a GPU before: its GPU test first,
# and the jax.numpy search for the switch's runs if the kernel fails (JAXDYN_SAMPLING_THRESHOLDS)
timeout 60 python -m pytest -q -m gpu tests/pallas_kernels/test_sampling_thresholds.py 2>&1 | tail -2 | tee $OUT/tests_thresholds.txt
grep -q " passed" $OUT/tests_thresholds.txt && ! grep -q "failed\|error" $OUT/tests_thresholds.txt && TH=auto || TH=reference
echo "thresholds for the switch: $TH" | tee -a $OUT/tests_thresholds.txt
timeout 490 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 160 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": "/tmp/memset", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_memset"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_switch", "JAXDYN_SAMPLING_THRESHOLDS": "'$TH'"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_memset_switch.txt | tail -16
