# Session 23's second device call (at most ~400 s by its limits): s21's next_call3 part 1 (the thunk sequences of a
# two-bucket fp8 engine with --sampler-switch and --skip-idle-prefill: are the switch's conditionals inside XLA's
# command buffers, or does the host pick the branch?), which callA's 0.925x for the switch asks; then the nested-layers
# check again with room (callA's 75 s limit cut it before it printed anything).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
XLA_FLAGS="--xla_dump_to=/tmp/xdump" timeout 150 python -m benchmarks.gpu.profile_run --windows none --quant fp8 \
  --num-prompts 64 --engine '{"kv_cache_dtype": "fp8", "token_buckets": [16, 2048], "sampler_switch": true, "skip_idle_prefill": true}' \
  2>&1 | grep -v "^W" | tail -4 | tee $OUT/switch_skip_run.txt
python -m benchmarks.gpu.thunk_census /tmp/xdump 2>&1 | tee $OUT/conditionals_in_graphs.txt
ls /tmp/xdump | grep -c . ; ls /tmp/xdump | grep -i thunk | head
ls /tmp/xdump | sed -E "s/^module_[0-9]+\.//; s/^[a-z_0-9]+\.//" | sort | uniq -c | sort -rn | head -40 > $OUT/dump_kinds.txt
for f in $(grep -l onditional /tmp/xdump/*thunk_sequence_after_thunk_passes*.txt 2>/dev/null | head -3); do
  gzip -c $f > $OUT/$(basename $f).gz; done    # the step's thunks, to read at leisure
timeout 200 python benchmarks/nested_layers_check.py --quant fp8 --buckets 16,2048 --sampler-switch > $OUT/nested_layers_check.txt 2>&1
echo "nested check rc=$?"; grep -v "^W" $OUT/nested_layers_check.txt | tail -12
