# Session 36, call 1 (~560 s; carry .gpu_wheels): the rope + KV-write kernel's GPU tests; offline A/B, two rounds,
# each configuration from its own empty JAX cache: the default against fused_rope_kv on; then profile_run's loop
# tables and traced kernel windows (a 2,048- and a 16-token bucket) of fused_rope_kv on (its cache warm), the
# 16-token step's optimized HLO.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 80 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_rope_kv.py 2>&1 \
  | grep -v "^W" | tail -30 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -8
timeout 250 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fused_rope_kv": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_rope_kv.txt | grep -v "^|" | grep "tok/s\|compiled" | cut -c1-330
JAX_COMPILATION_CACHE_DIR=/tmp/jc_b timeout 200 python -m benchmarks.gpu.profile_run --quant fp8 \
  --engine '{"kv_cache_dtype": "fp8", "fused_rope_kv": true}' --windows 150:153,1000:1003 --hlo 16 --out $OUT/prof \
  2>&1 | grep -v "^W" | tail -80 > $OUT/profile_run.txt
gzip -f $OUT/prof/*.hlo.txt 2>/dev/null; head -c 5000 $OUT/prof/profile_run.md 2>/dev/null || tail -20 $OUT/profile_run.txt
