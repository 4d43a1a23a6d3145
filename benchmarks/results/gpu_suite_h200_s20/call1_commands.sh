# Twentieth session, call 1: the engine offline with fp8 KV pages (the one-warp decode blocks of session 19) against
# the same with the lm_head in fp8 too (--quantize-lm-head), two rounds, shared compilation cache; before it, the
# fp8 GPU kernel tests for as long as they get.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 50 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k fp8 2>&1 | tail -2 | tee $OUT/tests.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 480 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 180 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_head.txt | tail -12
