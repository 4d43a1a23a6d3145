# For the next session's second device call (at most 560 s by its limits): the MLP quantization's warps; three rounds of fp8 KV with and without the fp8 lm_head,
# the 16-warp MLP quantization in the engine (the spread between runs of one configuration was up to 11 % in the
# twentieth session).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
# the MLP input's quantization: more warps or rows a program than the default 1/16 (32 warps: 1,024 threads)
timeout 70 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 768,2048 --quantize-inputs raw --quantize-configs 1/16,2/16,1/32,2/32 --reps 5 2>&1 | grep -v "^W" | tee $OUT/quantize_probe.txt
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 480 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 170 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_head.txt | tail -10
