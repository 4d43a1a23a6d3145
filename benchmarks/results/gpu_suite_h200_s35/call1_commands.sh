# Session 35, call 1 (~450 s; carry .gpu_wheels): the fused norm kernel (pallas_kernels/rms_norm_fp8.py) -- its GPU
# tests, its probe against XLA's fusions at 16-2,048 rows, then the offline A/B: fp8_fused_norm off against on,
# three rounds each, each configuration with its own JAX cache (round 0 cold: the cold start of each).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_rms_norm_fp8.py \
  tests/pallas_kernels/test_fp8_quantize.py 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 100 python -m benchmarks.gpu.norm_probe --rows 16,64,128,512,2048 --warps 4,8 2>&1 | grep -v "^W" \
  | tee $OUT/norm_probe.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_norm": false, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_norm": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_fused_norm.txt | grep -v "^|" | grep "tok/s" | cut -c1-330
