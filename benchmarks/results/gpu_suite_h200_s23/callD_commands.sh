# Session 23's last device call (~170 s with the start; 249 s of device time left): --sampler-switch with XLA's
# conditional command buffers on (a helper's reading of XLA: CONDITIONAL is not among xla_gpu_enable_command_buffer's
# defaults, so the switch runs as a ConditionalThunk that copies the branch index to the host and blocks on the stream
# every step, between two graphs; "+CONDITIONAL" adds it, CUDA graph conditional nodes pick the branch on the device;
# the switch's branches hold no sort, so they can be captured). One configuration, one round, from an empty cache:
# compare with callA's switch (cold 41.1 s, 14,881 tok/s round 0) and tree (15,744 tok/s round 0) on another machine.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 150 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_sc", "JAXDYN_SAMPLING_THRESHOLDS": "auto", "XLA_FLAGS": "--xla_gpu_enable_command_buffer=+CONDITIONAL"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_switch_conditional.txt | tail -8
