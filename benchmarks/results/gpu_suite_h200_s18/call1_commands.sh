# Eighteenth session, call 1: the split step with its logits kept in place (a buffer a bucket, donated to both
# calls). Offline A/B against one executable, each from its own empty compilation cache (cold start = load s of
# round 0); then each compiled call's host time by part and bucket; then the same with the forward's cuBLAS
# trace cache at 64 entries instead of 16.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
timeout 285 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 160 --configs '[{"quant": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc1"}}, {"quant": "fp8", "separate_sampler": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc2"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_split.txt | tail -9
export JAX_COMPILATION_CACHE_DIR=/tmp/jc2
P="python -m benchmarks.gpu.profile_host --quant fp8 --datasets sharegpt-lengths --call-times --top 5"
timeout 110 $P --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split.txt | grep -v "^ \|^$" | grep -v "| 1[0-9][0-9][0-9] |\|| [2-7][0-9][0-9] |" | tail -16
timeout 130 $P --engine '{"separate_sampler": true}' --part-options 'forward={"xla_cmd_buffer_trace_cache_size": 64}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split_trace64.txt | grep -v "^ \|^$" | grep -v "| 1[0-9][0-9][0-9] |\|| [2-7][0-9][0-9] |" | tail -16
