# Session 27's fourth call (~330 s at most): SKIP_TEMP as the engine's default (build_engine sets it,
# jaxdyn/engine/xla_options.py) against XLA's default mode set explicitly, each from its own empty JAX cache
# (the first round's load is the cold start), two rounds.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "from jaxdyn.engine.xla_options import command_buffer_update_mode as m; e = {}; print('engine adds:', m(e), e)" | tee -a $OUT/device.txt
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_au", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_default"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | tail -8
