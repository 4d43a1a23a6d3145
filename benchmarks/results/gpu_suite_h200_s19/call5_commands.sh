# Nineteenth session, call 5 (commit after 557dca6: fp8 pages take 2-page blocks over one warp, 6 stages): GPU tests
# over fp8 pages at more than 16 slots (the new blocks); one-warp variants around them; the engine offline with fp8
# KV pages against bf16 pages (two rounds, shared cache); last, one- and two-warp variants over bf16 pages.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 40 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k "fp8 and (40 or persistent or heads)" 2>&1 | tail -1 | tee $OUT/tests.txt
timeout 60 python -m benchmarks.kernels --decode-only --kv-dtype fp8 --sweep-variants 2:1:6:264:rows,2:1:8:264:rows,4:1:6:264:rows,1:1:8:264:rows,2:1:4:264:rows --sweep-points 768x304,256x512,256x2048 --points 768x304 --out $OUT/kernels_fp8.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_fp8.md
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 270 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[{"quant": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_kv.txt | tail -8
unset XLA_PYTHON_CLIENT_MEM_FRACTION
timeout 45 python -m benchmarks.kernels --decode-only --sweep-variants 4:4:3:264:rows,4:2:3:264:rows,2:1:6:264:rows,4:1:4:264:rows --sweep-points 768x304,256x512,256x2048 --points 768x304 --out $OUT/kernels_bf16.md 2>&1 | grep -v "^W" | tail -1
grep "^|" $OUT/kernels_bf16.md
