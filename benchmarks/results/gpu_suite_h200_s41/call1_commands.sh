# Session 41, call 1 (~420 s; carry .gpu_wheels and .ab_trees/s41base = `git archive 48cb664`, before the change):
# the in-place attention output's zeros tied to each layer's query (no per-layer copy of one shared zeros buffer):
# its GPU test and the kernels' in-place tests, then offline A/B, three rounds, each configuration from its own
# empty JAX cache: the tree before, this tree, and this tree without the 16-token bucket.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 75 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_kernels.py \
  -k "not_copies or (in_place and 40)" 2>&1 | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -12
timeout 380 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"tree": ".ab_trees/s41base", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "token_buckets": [64, 128, 192, 256, 384, 512, 768, 1024, 2048],
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_zeros_buckets.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_zeros_buckets.txt | cut -c1-400
