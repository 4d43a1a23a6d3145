# The next device session's first call (written in session 24, when no device was lent after callE's machine stopped
# answering; at most ~470 s by its limits): where a step's call waits, and what the switch costs a call.
# - Session 6's dispatch_probe found that, called back to back, a 512-token step's call returns only when the previous
#   step is done (with host or device inputs), at 16-128 tokens it does not.
# - XLA (753e5e56, a helper's reading, session 24) updates a command buffer whenever a buffer one of its commands
#   uses moved: parameters, outputs and the temp buffer are all tracked (xla_gpu_command_buffer_update_mode
#   ALWAYS_UPDATE). SKIP_TEMP gives the temp a fixed address, SKIP_PROFILED also the inputs and outputs a few
#   profiling runs found stable (both through the VMM allocator). Traced commands (cuBLAS) re-capture a stream trace
#   on new addresses. Session 24 also built the switch's branches on fixed buffers (step_copy): a recorded
#   conditional's branches are re-recorded when a buffer they use moves.
# So: the command-buffer kinds in this jaxlib, then dispatch_probe (call ms idle and back to back, buckets 128 and
# 512, fp8 weights and pages) for the tree under the three update modes, the switch, and the switch with its buffers
# moving (switch_moving_buffers.patch on a copy). An update mode this jaxlib does not take is skipped.
# Then next_call2_commands.sh (the same-machine decision on the default), and gpu_suite_h200_s23/callB_commands.sh.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "from benchmarks.gpu.thunk_census import default_command_buffer_kinds as k; print('kinds', k())" | tee $OUT/kinds.txt
ROOT=$PWD; mkdir -p /tmp/moving && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/moving/ \
  && (cd /tmp/moving && patch -p1 < $ROOT/benchmarks/results/gpu_suite_h200_s24/switch_moving_buffers.patch) | tail -1
probe() {   # $1: RunnerConfig JSON; $2: label; then the command's environment prefix, if any
  timeout 85 python -m benchmarks.gpu.dispatch_probe --quant fp8 --buckets 128,512 --steps 30 --runner "$1" 2>&1 \
    | grep -v "^W" | sed "s|^reproduce:|$2, reproduce:|" | tee -a $OUT/dispatch.md | tail -10; }
probe '{"kv_cache_dtype": "fp8"}' "tree"
for MODE in SKIP_TEMP SKIP_PROFILED; do
  if XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE python -c "import jax; jax.numpy.ones(1).block_until_ready()" \
      > /dev/null 2>&1; then
    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$MODE probe '{"kv_cache_dtype": "fp8"}' "tree, update mode $MODE"
  else echo "update mode $MODE: not taken by this jaxlib" | tee -a $OUT/dispatch.md; fi; done
probe '{"kv_cache_dtype": "fp8", "sampler_switch": true}' "switch"
(cd /tmp/moving && PYTHONPATH=/tmp/moving:/tmp/pydeps probe '{"kv_cache_dtype": "fp8", "sampler_switch": true}' \
  "switch with moving buffers (switch_moving_buffers.patch)")
