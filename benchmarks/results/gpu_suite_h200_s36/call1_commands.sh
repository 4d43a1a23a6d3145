# Session 36, call 1 (~540 s; carry .gpu_wheels and .ab_trees/s35 = `git archive 2e7db1f`, session 35's end): the
# rope + KV-write kernel's GPU tests and the entry point's in-place ones (the few-slot calls' splits now merged by a
# kernel into the in-place rows); offline A/B, two rounds, each configuration from its own empty JAX cache: session
# 35's tree, this tree (the merge kernel), this tree with fused_rope_kv on, and that with XLA's programmatic
# dependent launch (--xla_gpu_enable_pdl=true).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 120 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_rope_kv.py \
  tests/pallas_kernels/test_kernels.py -k "rope or (match_reference_in_bf16 and in_place) or picks_the_kernels" 2>&1 \
  | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -12
timeout 390 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"tree": ".ab_trees/s35", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fused_rope_kv": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fused_rope_kv": true,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_d", "XLA_FLAGS": "--xla_gpu_enable_pdl=true"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_rope_kv.txt | grep -v "^|" | grep "tok/s\|compiled\|rror" | cut -c1-330
