# Session 42, call 4 (~430 s; carry .gpu_wheels; an H100): the opt-in levers on the current tree, three rounds each
# from its own empty JAX cache: the default, the fp8 lm_head (`--quantize-lm-head`), and it with `--schedule-policy
# lof` (the engine admits the largest max_tokens first; the benchmark fixes each request's output length).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 430 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "schedule_policy": "lof", "quantize_lm_head": true,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_levers.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab_levers.txt | cut -c1-400
