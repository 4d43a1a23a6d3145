# For the next device session's third call (written in the twenty-first session; at most ~580 s by its limits):
# 1. how XLA's command buffers split a step, and whether the two conditionals are inside them: the thunk sequences
#    after XLA's thunk passes of a two-bucket fp8 engine with --sampler-switch and --skip-idle-prefill (thunks by
#    kind: command buffers, memsets, copies, conditionals; each conditional with the thunk that holds it: inside a
#    command buffer, the branch is picked on the device; at the top level, the host waits for the index);
# 2. the sampler alone: greedy, plain, full with a sort (the variants' executables) and full sort-free (the switch's
#    branch: jax.numpy at 1, 2 and 4 bits a pass, and the Pallas thresholds kernel) at 16-1,024 rows of the 8B
#    vocabulary, every part on every row;
# 0. (added in the twenty-second session) whether the nested layers (RunnerConfig.nested_layers, on by default since
#    then: one layer traced, its jaxpr inlined for each) leave the compiled step as the unrolled one, as on the CPU:
#    the fp8 engine's 16- and 2,048-token switch steps compiled both ways, their optimized programs' instructions
#    compared (last line: same / differ);
# 3. the GPU tests of the skip and of the thresholds kernel, then the engine offline with and without
#    --skip-idle-prefill (one JAX cache shared: the second configuration compiles its own steps), one round each (the
#    warm-up's step costs by bucket are the finer figure).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 75 python benchmarks/nested_layers_check.py --quant fp8 --buckets 16,2048 --sampler-switch 2>&1 | grep -v "^W" \
  | tee $OUT/nested_layers_check.txt | tail -12
XLA_FLAGS="--xla_dump_to=/tmp/xdump" timeout 150 python -m benchmarks.gpu.profile_run --windows none --quant fp8 \
  --num-prompts 64 --engine '{"kv_cache_dtype": "fp8", "token_buckets": [16, 2048], "sampler_switch": true, "skip_idle_prefill": true}' \
  2>&1 | grep -v "^W" | tail -4 | tee $OUT/switch_skip_run.txt
python -m benchmarks.gpu.thunk_census /tmp/xdump 2>&1 | tee $OUT/conditionals_in_graphs.txt
ls /tmp/xdump | grep -c . ; ls /tmp/xdump | grep -i thunk | head
for f in $(grep -l onditional /tmp/xdump/*thunk_sequence_after_thunk_passes*.txt 2>/dev/null | head -3); do
  gzip -c $f > $OUT/$(basename $f).gz; done    # the step's thunks, to read at leisure
timeout 75 python -m benchmarks.gpu.sampler_probe --rows 16,1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt | tail -14
timeout 45 python -m pytest -q -m gpu tests/pallas_kernels/test_kernels.py tests/pallas_kernels/test_sampling_thresholds.py -k "gpu_skip or gpu_kernel_keeps" 2>&1 | tail -2 | tee $OUT/tests_skip_thresholds.txt
export JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 230 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 150 --configs '[{"quant": "fp8", "kv_cache_dtype": "fp8"}, {"quant": "fp8", "kv_cache_dtype": "fp8", "skip_idle_prefill": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_skip.txt | tail -10
