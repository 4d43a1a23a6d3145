# Session 27's fourth call (~300 s at most, the budget left): SKIP_TEMP as the engine's default (build_engine and
# dispatch_probe set it, jaxdyn/engine/xla_options.py) against XLA's default mode set explicitly.
# 1. what the engine adds to XLA_FLAGS on this machine; 2. dispatch_probe at 128 tokens under both (the default
# mode's host-input step took 5.25 ms of device time against 4.21 in call 1); 3. ab_offline, one round each from
# its own empty JAX cache (the load is the cold start).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "from jaxdyn.engine.xla_options import command_buffer_update_mode as m; e = {}; print('engine adds:', m(e), e)" | tee -a $OUT/device.txt
AU=--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE
P="python -m benchmarks.gpu.dispatch_probe --quant fp8 --buckets 128 --steps 30 --runner {\"kv_cache_dtype\":\"fp8\"}"
XLA_FLAGS=$AU timeout 60 $P 2>&1 | grep -v "^W" | tee -a $OUT/dispatch.md | tail -6
timeout 60 $P 2>&1 | grep -v "^W" | tee -a $OUT/dispatch.md | tail -6
timeout 200 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 100 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_au", "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_default"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_default.txt | tail -8
