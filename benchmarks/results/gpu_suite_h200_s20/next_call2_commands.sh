# For the next session's second device call (at most 540 s by its limits; the GPU tests of the skip first): the engine offline with fp8 KV pages, the
# same with the prefill kernel skipped in decode-only steps (--skip-idle-prefill, built in the twentieth session and
# not yet run on a GPU: does XLA keep the per-layer conditional inside its command buffers?), and with the fp8
# lm_head (the 16-warp MLP quantization is in all three). Two rounds: three cold compiles take most of the call.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
timeout 50 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py -k gpu_skip 2>&1 | tail -2 | tee $OUT/tests_skip.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 480 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "skip_idle_prefill": true}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_skip_head.txt | tail -12
