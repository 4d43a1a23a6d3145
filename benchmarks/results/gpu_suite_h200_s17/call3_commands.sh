# Seventeenth session, call 3: where the sampler apart spends host time on a GPU. Each compiled call timed on the
# host by part and bucket (profile_host --call-times): one executable a step; the forward and the sampler apart;
# the same with the sampler's calls compiled without CUDA graphs.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
P="python -m benchmarks.gpu.profile_host --quant fp8 --datasets sharegpt-lengths --call-times --top 12"
timeout 230 $P 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_one.txt | grep -v "^ \|^$" | tail -24
timeout 170 $P --engine '{"separate_sampler": true}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split.txt | grep -v "^ \|^$" | tail -30
timeout 150 $P --engine '{"separate_sampler": true}' --part-options 'sample={"xla_gpu_graph_min_graph_size": 100000}' 2>&1 | grep -v "^W\|Warning" | tee $OUT/calls_split_nograph.txt | grep -v "^ \|^$" | tail -30
