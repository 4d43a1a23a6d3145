pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python -m benchmarks.gpu.ab_offline --configs '[{"quant": "fp8", "fp8_fused_quantize": "off"}, {"quant": "fp8"}]' --rounds 3 2>&1 | tail -12 | tee $OUT/ab_fused_default.txt
timeout 200 python -m benchmarks.gpu.gpu --out $OUT/serve --sections serve --datasets sharegpt-lengths --quant fp8 --budget-s 180 2>&1 | tail -30 | tee $OUT/serve_fp8.txt
