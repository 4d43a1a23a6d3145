# The next device session's first call (written in session 24, when no device was lent after callE's machine stopped
# answering; at most ~420 s by its limits). Session 24 found that CONDITIONAL is already one of XLA's default
# command-buffer kinds (so session 23's callD "+CONDITIONAL" changed nothing, and callD's 15,608 tok/s is another
# machine's figure), and built the switch's branches to read and write only buffers of the step's own
# (pallas_kernels.paged_decode.step_copy): XLA re-records every branch of a recorded conditional when a buffer one of
# them uses moves, and the step's inputs and outputs move every call. This call asks where the switch's time goes:
#   - the kinds in this jaxlib (0.11.2);
#   - the compiled step's call time, tree against switch, idle and back to back (dispatch_probe), as committed and
#     with the switch's buffers moving (switch_moving_buffers.patch on a copy): a call that takes longer back to
#     back is the re-recording;
#   - gpu_suite_h200_s23/callB's first part: are the switch's conditionals inside the step's command buffer.
# Then next_call2_commands.sh (the same-machine decision on the default).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
python -c "from benchmarks.gpu.thunk_census import default_command_buffer_kinds as k; print('kinds', k())" | tee $OUT/kinds.txt
ROOT=$PWD; mkdir -p /tmp/moving && cp -r jaxdyn pallas_kernels checkpoints benchmarks serving /tmp/moving/ \
  && (cd /tmp/moving && patch -p1 < $ROOT/benchmarks/results/gpu_suite_h200_s24/switch_moving_buffers.patch) | tail -1
for R in '{"kv_cache_dtype": "fp8"}' '{"kv_cache_dtype": "fp8", "sampler_switch": true}'; do
  timeout 90 python -m benchmarks.gpu.dispatch_probe --quant fp8 --buckets 64,384 --steps 30 --runner "$R" 2>&1 \
    | grep -v "^W" | tee -a $OUT/dispatch_tree_switch.md | tail -11; done
(cd /tmp/moving && PYTHONPATH=/tmp/moving:/tmp/pydeps timeout 90 python -m benchmarks.gpu.dispatch_probe --quant fp8 \
  --buckets 64,384 --steps 30 --runner '{"kv_cache_dtype": "fp8", "sampler_switch": true}' 2>&1 | grep -v "^W" \
  | sed 's/^reproduce:/moving buffers (switch_moving_buffers.patch), reproduce:/' | tee -a $OUT/dispatch_tree_switch.md | tail -11)
XLA_FLAGS="--xla_dump_to=/tmp/xdump" timeout 120 python -m benchmarks.gpu.profile_run --windows none --quant fp8 \
  --num-prompts 64 --engine '{"kv_cache_dtype": "fp8", "token_buckets": [16, 2048], "sampler_switch": true}' \
  2>&1 | grep -v "^W" | tail -4 | tee $OUT/switch_run.txt
python -m benchmarks.gpu.thunk_census /tmp/xdump 2>&1 | tee $OUT/conditionals_in_graphs.txt | head -30
for f in $(grep -l onditional /tmp/xdump/*thunk_sequence_after_thunk_passes*.txt 2>/dev/null | head -2); do
  gzip -c $f > $OUT/$(basename $f).gz; done    # the step's thunks, to read at leisure
