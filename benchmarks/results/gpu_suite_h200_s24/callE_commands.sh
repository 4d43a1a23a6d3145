# Session 24's first device call: the same-machine decision on --sampler-switch as the default, trimmed from
# gpu_suite_h200_s23/next_callE_commands.sh after that call's machine stopped answering (516 s of the budget lost):
# the tree's default against the switch as committed (its steps compile with runner.CONDITIONAL_COMMAND_BUFFERS),
# each from its own empty JAX cache, two rounds. The option-off configuration is left out (callA measured it: 0.925x).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_sw"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_switch_decision.txt | tail -12
