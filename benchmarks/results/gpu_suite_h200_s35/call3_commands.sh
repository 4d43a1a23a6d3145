# Session 35, call 3 (~380 s; carry .gpu_wheels and .base_tree = b8ae32c, session 34's end): the default
# (fp8_fused_norm "auto": on for an fp8 model on a GPU) against b8ae32c, and the default with the fused
# quantization from every step (fp8_fused_quantize_min_tokens 0: o_proj's and down_proj's inputs through
# pallas_kernels.fp8_quantize in the 16-384-token steps too), two rounds, each with its own empty JAX cache (round 0:
# the cold start).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 560 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"tree": ".base_tree", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "fp8_fused_quantize_min_tokens": 0,
   "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | grep -v "^|" | grep "tok/s\|compiled" | cut -c1-330
