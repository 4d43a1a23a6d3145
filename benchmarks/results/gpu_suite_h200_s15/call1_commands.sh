# Fifteenth session, call 1: the scaled fp8 quantization path's GPU tests; XLA's command buffers (CUDA graphs)
# A/B by wall clock on the small steps (fp8, buckets 16/64/128/512/2,048 to shorten the cold compiles).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python -m pytest -q -m gpu tests/pallas_kernels/test_fp8_quantize.py tests/jaxdyn/test_fp8_linear.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
B='"token_buckets": [16, 64, 128, 512, 2048]'
timeout 440 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 200 --configs "[
 {\"quant\": \"fp8\", $B},
 {\"quant\": \"fp8\", $B, \"env\": {\"XLA_FLAGS\": \"--xla_gpu_enable_command_buffer=\"}},
 {\"quant\": \"fp8\", $B, \"env\": {\"XLA_FLAGS\": \"--xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_cub_radix_sort=false\"}},
 {\"quant\": \"fp8\", $B, \"env\": {\"XLA_FLAGS\": \"--xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_cub_radix_sort=false --xla_gpu_command_buffer_update_mode=SKIP_TEMP\"}}
]" 2>&1 | tail -20 | tee $OUT/ab_command_buffers.txt
