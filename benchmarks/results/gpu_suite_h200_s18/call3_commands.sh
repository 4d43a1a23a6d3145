# Eighteenth session, call 3 (commit 10b3de7): the split step moves its three host buffers once (device_put) and
# the forward returns no pass-through outputs. Each call's host time by part and bucket; offline A/B of one
# executable, the sampler apart, and the sampler apart with longest-output-first; then the host events of the
# 2,048-token and 16-token forwards (command-buffer updates).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 110 python -m benchmarks.gpu.profile_host --quant fp8 --datasets sharegpt-lengths --call-times --top 5 --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split.txt | grep -v "^ \|^$" | tail -24
timeout 290 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 150 --configs '[{"quant": "fp8"}, {"quant": "fp8", "separate_sampler": true}, {"quant": "fp8", "separate_sampler": true, "schedule_policy": "lof"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_split.txt | tail -9
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true timeout 150 python -m benchmarks.gpu.profile_run --quant fp8 --windows 3:6,900:905 --host-top 30 --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/host_split.txt | grep "command_buffer\|memcpy\|cuGraph\|Execute (" 
