# Fifteenth session, call 4: fp8 KV pages with the products in float16 and 8-page decode blocks. GPU tests of the
# kernels on fp8 pages; the engine A/B (fp8 weights, KV auto vs fp8); the decode kernel's grid on fp8 pages;
# then a small block sweep on fp8 pages for the record.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 80 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k fp8 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
timeout 200 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 150 --configs '[{"quant": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8"}]' 2>&1 | tail -8 | tee $OUT/ab_kv_fp8.txt
timeout 40 python -m benchmarks.kernels --sweep none --decode-only --kv-dtype fp8 --points 1x2048,8x2048,64x2048,256x2048,32x8192 --out $OUT/kernels_fp8.md 2>&1 | tail -3
timeout 50 python -m benchmarks.kernels --sweep small --sweep-kernels decode --decode-only --kv-dtype fp8 --points 64x2048,256x2048 --out $OUT/kernels_fp8_sweep.md 2>&1 | tail -3
