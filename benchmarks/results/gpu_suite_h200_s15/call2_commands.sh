# Fifteenth session, call 2 (fp8_fused_quantize "auto" = "all" from 512 tokens): the sampler compiled apart
# against one executable a step (round 0 = cold start from an empty cache); then the served fp8 run.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 250 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 200 --configs '[{"quant": "fp8"}, {"quant": "fp8", "separate_sampler": true}]' 2>&1 | tail -8 | tee $OUT/ab_separate_sampler.txt
timeout 300 python -m benchmarks.gpu.gpu --out $OUT/serve --sections serve --datasets sharegpt-lengths --quant fp8 --budget-s 280 2>&1 | tail -30 | tee $OUT/serve_fp8.txt
