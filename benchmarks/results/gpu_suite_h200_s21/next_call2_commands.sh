# For the next device session's second call (written in the twenty-first session, which was lent no device; it
# replaces gpu_suite_h200_s20/next_call2_commands.sh; at most ~560 s by its limits). The GPU tests of the skip, then
# the engine offline, each configuration from its own empty JAX cache, so that each one's first run's load seconds
# are its cold start (round 0) and its second run is warm (round 1):
#   - fp8 w8a8 with fp8 KV pages (the reference);
#   - + --skip-idle-prefill (a lax.cond a layer around the prefill kernel: does XLA keep it in its CUDA graph?);
#   - + --sampler-switch (one executable a bucket, the sampler variant a lax.switch on the device: the cold start
#     should fall toward --separate-sampler's 37-51 s, with one call a step).
# Each run prints its warm-up's compilation (executables, threads, wall, XLA's seconds summed, the slowest).
# Copy $OUT's files into gpu_suite_h200_s22/ (prefixed callN_).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 50 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k gpu_skip 2>&1 | tail -2 | tee $OUT/tests_skip.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 480 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "skip_idle_prefill": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_skip"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_switch"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_skip_switch.txt | tail -16
