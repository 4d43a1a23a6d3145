# Session 26's third call: next_call1_commands.sh trimmed to the tree (the switch stays off): does a step's call,
# made back to back, wait for the previous step, and does an update mode that keeps buffers in place change it?
# dispatch_probe, fp8 weights and pages, buckets 128 and 512, under ALWAYS_UPDATE (default), SKIP_TEMP, SKIP_PROFILED.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
probe() {   # $1: label; the command's environment prefix, if any
  timeout 85 python -m benchmarks.gpu.dispatch_probe --quant fp8 --buckets 128,512 --steps 30 \
    --runner '{"kv_cache_dtype": "fp8"}' 2>&1 | grep -v "^W" | sed "s|^reproduce:|$1, reproduce:|" \
    | tee -a $OUT/dispatch.md | tail -10; }
probe "tree"
for MODE in SKIP_TEMP SKIP_PROFILED; do
  if XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE python -c "import jax; jax.numpy.ones(1).block_until_ready()" \
      > /dev/null 2>&1; then
    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE probe "tree, update mode $MODE"
  else echo "update mode $MODE: not taken by this jaxlib" | tee -a $OUT/dispatch.md; fi; done
