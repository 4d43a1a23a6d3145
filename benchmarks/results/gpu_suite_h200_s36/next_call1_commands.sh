# Prepared in session 36 for the next session (~560 s; carry .gpu_wheels and .ab_trees/s35 = `git archive 2e7db1f`,
# session 35's end). Session 36 ran out of device time after one call: its split merge kernel was rewritten after that
# call (rows without a live query store zeros without reading partials; chunks of 16 splits) and its GPU test of the
# rope kernel in the jitted model never ran. This call: those GPU tests and every GPU test of the kernels touched
# (pytest's 240 s, -v: each outcome listed as it comes), then the default (fused_rope_kv on) against session 35's
# tree, three rounds, each from its own empty JAX cache.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 240 python -m pytest -m gpu -p no:cacheprovider -rA -v tests/jaxdyn/test_fused_rope_kv.py \
  tests/pallas_kernels/test_rope_kv.py tests/pallas_kernels/test_kernels.py \
  -k "rope or picks_the_kernels or skip_idle or (match_reference_in_bf16 and in_place)" 2>&1 \
  | grep -v "^W" | tail -60 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error|PASSED" $OUT/gpu_tests.txt | tail -30
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 120 --configs '[
  {"tree": ".ab_trees/s35", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
