# Thirtieth session, call 1 (~540 s at most): the decode kernel's products on the GPU's fp8 matrix instructions
# (DecodeBlockSizes.fp8_products: "qk" the scores from an e4m3 query per row and the fp8 keys as stored, "qk_pv" the
# values' product too) against the widened float16 products: GPU tests, the kernel at the run's decode shapes, then
# the engine offline with EngineConfig.attention_fp8_products "qk" against "off" (two rounds, one JAX cache each).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 70 python -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_kernels.py -k fp8_products 2>&1 \
  | tail -4 | tee $OUT/gpu_tests.txt
V=2:1:6:264:rows,2:1:6:264:rows:qk,2:1:6:264:rows:qk_pv,4:1:6:264:rows:qk,4:4:3:264:rows:qk
timeout 150 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants $V \
  --sweep-points 32x800,88x640,200x500,768x304 --points 1x512 --out $OUT/kernels_fp8_products.md 2>&1 \
  | grep -v "^W" | tail -3
grep "^|" $OUT/kernels_fp8_products.md | head -9
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 310 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_off"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "attention_fp8_products": "qk", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_qk"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_fp8_products.txt | tail -7
