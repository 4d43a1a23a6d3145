# Fifteenth session, call 3: fp8 KV pages (--kv-cache-dtype fp8). The kernels' GPU tests on fp8 pages; the
# decode kernel on bf16 and fp8 pages against the HBM bandwidth; the engine A/B (fp8 weights, KV auto vs fp8).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
for d in bf16 fp8; do
  timeout 100 python -m benchmarks.kernels --sweep none --decode-only --kv-dtype $d --points 1x2048,8x2048,64x2048,256x2048,32x8192 --out $OUT/kernels_$d.md 2>&1 | grep -v "^correctness" | tail -4
done
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 200 --configs '[{"quant": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8"}]' 2>&1 | tail -12 | tee $OUT/ab_kv_fp8.txt
