# Seventeenth session, call 4: is the sampler-apart forward's host cost JAX's Python path (slow-path calls
# counted, outputs' types)? Then the same with the forward returning its input buffers through an optimization
# barrier (forward_barrier.patch), and, patched, the offline A/B of the sampler apart against one executable.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
P="python -m benchmarks.gpu.profile_host --quant fp8 --datasets sharegpt-lengths --call-times --top 5"
timeout 140 $P --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split.txt | grep -v "^ \|^$" | grep -v "| 1[0-9][0-9][0-9] |\|| [2-7][0-9][0-9] |" | tail -16
git apply benchmarks/results/gpu_suite_h200_s17/forward_barrier.patch && git diff --stat
timeout 140 $P --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split_barrier.txt | grep -v "^ \|^$" | tail -26
timeout 220 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 140 --configs '[{"quant": "fp8"}, {"quant": "fp8", "separate_sampler": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_split_barrier.txt | tail -9
