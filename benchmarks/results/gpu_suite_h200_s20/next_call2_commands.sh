# For the next session's second device call (about 450 s): three rounds of fp8 KV with and without the fp8 lm_head,
# the 16-warp MLP quantization in the engine (the spread between runs of one configuration was up to 11 % in the
# twentieth session).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 480 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 170 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_head.txt | tail -10
