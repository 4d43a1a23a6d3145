# Prepared for session 43 (~540 s; carry .gpu_wheels; an H100, kind nvidia-h100-x1): 1) the fp8 decode kernel's
# blocks on an H100 (the table came from an H200 sweep, session 19) at the shapes of the run's large steps, where
# session 40's profile read the 2,048-token step's decode attention at 1.67x its bytes (431 rows x 274 tokens);
# 2) the opt-in levers again on a host that holds its speed (session 42's call 4 slowed after its first round):
# the default, the fp8 lm_head, and it with lof, three rounds each from its own empty cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 150 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-points 432x274,768x304,256x512,64x800 --points 432x274 \
  --sweep-variants 2:1:6:264:rows,2:2:6:264:rows,4:1:6:264:rows,4:2:4:264:rows,2:1:8:264:rows,1:1:8:264:rows \
  --out $OUT/fp8_blocks_h100.md 2>&1 | grep -v "^W" | tail -14
timeout 360 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "schedule_policy": "lof", "quantize_lm_head": true,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_levers.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab_levers.txt | cut -c1-400
