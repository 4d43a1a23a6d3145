# Session 40, call 2 (~260 s; carry .gpu_wheels and .ab_trees/s40base = `git archive abf0f14`, before the change), run at
# 0912e2c (c3f208a's scaled rope kernel, reverted after this call): the kernel's GPU tests (also scaling the q/k/v product's raw fp8 result),
# then offline A/B, three rounds, each configuration from its own empty JAX cache: the tree before against this one.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 100 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_rope_kv.py \
  tests/jaxdyn/test_fused_rope_kv.py 2>&1 | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -12
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 110 --configs '[
  {"tree": ".ab_trees/s40base", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_scaled_rope.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
grep "^|" $OUT/ab_scaled_rope.txt | cut -c1-400
