# Session 36, call 2 (~450 s; carry .gpu_wheels and .ab_trees/s35 = `git archive 2e7db1f`): the GPU tests of the
# session's kernels (rope_kv alone and in the jitted model; the entry point in place, the few-slot calls' split merge
# kernel; skip_idle_prefill) with fused_rope_kv on by default; then offline A/B, three rounds, each configuration from
# its own empty JAX cache: session 35's tree against this tree's default.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 170 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_rope_kv.py \
  tests/jaxdyn/test_fused_rope_kv.py tests/pallas_kernels/test_kernels.py \
  -k "rope or (match_reference_in_bf16 and in_place) or picks_the_kernels or skip_idle" 2>&1 \
  | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|PASSED|Error" $OUT/gpu_tests.txt | tail -30
timeout 270 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 120 --configs '[
  {"tree": ".ab_trees/s35", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-250
grep "^|" $OUT/ab_default.txt | cut -c1-200
