# Nineteenth session, call 4 (commit after 3c: fp8 pages take 2-page blocks over 2 warps, 6 stages): the GPU tests
# over fp8 pages with the new blocks; a sweep around them (fp8) and the same direction for bf16 pages; then the
# engine offline with fp8 KV pages against bf16 pages (two rounds, shared compilation cache).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 100 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k "fp8" 2>&1 | tail -2 | tee $OUT/tests.txt
timeout 100 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 2:2:6:264:rows,2:2:4:264:rows,2:2:8:264:rows,4:2:5:264:rows,1:2:8:264:rows,2:1:6:264:rows --sweep-points 768x304,256x512,256x2048,64x2048 --points 768x304 --out $OUT/kernels_fp8.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8.md
timeout 80 python -m benchmarks.kernels --decode-only --sweep-variants 4:4:3:264:rows,2:2:6:264:rows,4:2:5:264:rows,4:2:3:264:rows --sweep-points 768x304,256x512,256x2048,64x2048 --points 768x304 --out $OUT/kernels_bf16.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_bf16.md
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[{"quant": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_kv.txt | tail -8
