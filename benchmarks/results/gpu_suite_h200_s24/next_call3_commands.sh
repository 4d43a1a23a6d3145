# A later device call (written in session 24; at most ~430 s by its limits), if next_call1's dispatch_probe shows the
# back-to-back call shorter under an update mode: the tree offline under XLA's command-buffer update modes
# (ALWAYS_UPDATE, the default; SKIP_TEMP; SKIP_PROFILED), each from its own empty JAX cache, two rounds.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_always"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_temp", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_prof", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=SKIP_PROFILED"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_update_modes.txt | tail -14
