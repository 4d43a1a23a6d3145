# The next device session's second call (written in session 24; at most ~510 s by its limits): the same-machine
# decision on --sampler-switch as the default. The tree, the switch as committed (its branches on the step's own
# buffers), and the switch with its buffers moving (switch_moving_buffers.patch on a copy: the switch callA measured
# at 0.925x), each from its own empty JAX cache, two rounds. Flip the default if the switch is >= 0.99x the tree and
# its cold start <= 60 s.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
ROOT=$PWD; mkdir -p /tmp/moving && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/moving/ \
  && (cd /tmp/moving && patch -p1 < $ROOT/benchmarks/results/gpu_suite_h200_s24/switch_moving_buffers.patch) | tail -1
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_tree"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_sw"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "sampler_switch": true, "tree": "/tmp/moving", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_mv"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_switch_decision.txt | tail -14
# The tree's engine loop untraced, with the host time inside the compiled steps' calls apart (session 24's
# step_call_seconds): is the host over the step cost at 16-511 running (session 20's table) host work, or a call
# that waits for the device? From config 0's warm JAX cache.
JAX_COMPILATION_CACHE_DIR=/tmp/jc_tree timeout 80 python -m benchmarks.gpu.profile_run --windows none --quant fp8 \
  --engine '{"kv_cache_dtype": "fp8"}' 2>&1 | grep -v "^W" | tee $OUT/loop_untraced.md | tail -24
