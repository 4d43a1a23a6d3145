# The next device session's first call (written in session 23; at most ~560 s by its limits): the decision on
# --sampler-switch as the default. callD measured the switch with XLA_FLAGS "+CONDITIONAL" on one machine (cold
# 34.3 s, 15,608 tok/s) and callA the tree on another (71.4 s, 15,518 median). Since 771450d the switch's steps
# compile with the conditional command buffers as a compiler option (runner.CONDITIONAL_COMMAND_BUFFERS, the
# product's path, not yet run on a GPU). Same machine, each from its own empty JAX cache, two rounds:
#   - the tree's default (three sampler variants a bucket);
#   - --sampler-switch as committed (the compiler option);
#   - --sampler-switch with the option overridden off (XLA_FLAGS names the command buffers: XLA's defaults),
#     which callA measured at 0.925x: the option's own effect in the same call.
# Flip the default if the switch is >= 0.99x the tree and its cold start <= 60 s.
# Then, if time is left: gpu_suite_h200_s23/callB_commands.sh (thunk sequences, the nested-layers check).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 540 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_sw"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_sw_off", "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_switch_decision.txt | tail -14
