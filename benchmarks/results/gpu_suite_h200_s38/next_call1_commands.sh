# Prepared in session 38 for the next session (~540 s; carry .gpu_wheels; session 38 could start no second machine):
# session 37's two levers (seq_buckets [[2048, 512]] and prefill_programs 1056, now the suite engine's) off against
# on, three rounds each from its own empty JAX cache, with the warm-up's step costs timed round by round (is the
# 16-token bucket's cost now steady?); then the default's profile (loop tables, traced windows at a 2,048- and a
# 16-token bucket, both steps' optimized HLO) from the default's warm cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 280 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "seq_buckets": [], "prefill_programs": null,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_levers.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_levers.txt | cut -c1-400
. benchmarks/results/gpu_suite_h200_s39/profile_commands.sh
