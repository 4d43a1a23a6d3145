# Eighteenth session, call 2: where the sampler-apart forward's call spends host time. profile_run's host events
# (XLA / PJRT annotations) with command buffers kept under the profiler, the sampler apart and one executable,
# windows of 2,048-token steps (3:6) and 16-token steps (900:905); then the forward's calls timed with the
# forward compiled without CUDA graphs.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
R="python -m benchmarks.gpu.profile_run --quant fp8 --windows 3:6,900:905 --host-top 30"
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true timeout 170 $R --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/host_split.txt | tail -80
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true timeout 220 $R 2>&1 | grep -v "^W\|Warning" | tee $OUT/host_one.txt | tail -80
timeout 140 python -m benchmarks.gpu.profile_host --quant fp8 --datasets sharegpt-lengths --call-times --top 5 --engine '{"separate_sampler": true}' --part-options 'forward={"xla_gpu_graph_min_graph_size": 100000}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split_fwd_nograph.txt | grep -v "^ \|^$" | grep -v "| 1[0-9][0-9][0-9] |\|| [2-7][0-9][0-9] |" | tail -16
