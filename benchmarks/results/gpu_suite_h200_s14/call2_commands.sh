pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 80 python -m pytest -q -m gpu tests/pallas_kernels/test_fp8_quantize.py tests/jaxdyn/test_fp8_linear.py 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
timeout 170 python -m benchmarks.gpu.fp8_matmul_probe --quantize-only --quantize-rows 16,768,2048 --reps 10 2>&1 | tee $OUT/quantize_probe.txt
timeout 330 python -m benchmarks.gpu.ab_offline --configs '[{"quant": "fp8"}, {"quant": "fp8", "fp8_fused_quantize": "all"}]' --rounds 2 2>&1 | tail -12 | tee $OUT/ab_fused_quantize.txt
