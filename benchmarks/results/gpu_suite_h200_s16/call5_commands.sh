# Sixteenth session, call 5 (the machine still warm from call 4): the fused fp8 quantization in every step
# (fp8_fused_quantize_min_tokens 0) against the default floor of 512 tokens.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 160 --configs '[{"quant": "fp8"}, {"quant": "fp8", "fp8_fused_quantize_min_tokens": 0}]' 2>&1 | grep -v "^W" | tee $OUT/ab_fused_min0.txt | tail -12
