# Prepared for session 41 (~480 s; carry .gpu_wheels): on an H100 (nvidia-h100-x1), the suite engine against it
# without the 16-token bucket (the 64-token step read cheaper than the 16-token one in every round of sessions 38-40:
# the tail's ~420 steps of at most 16 rows would run in the 64-token executable) and against it with both opt-in
# levers (schedule_policy "lof", the fp8 lm_head), three rounds each from its own empty JAX cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 460 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "token_buckets": [64, 128, 192, 256, 384, 512, 768, 1024, 2048],
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "schedule_policy": "lof", "quantize_lm_head": true,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_buckets_levers.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_buckets_levers.txt | cut -c1-400
