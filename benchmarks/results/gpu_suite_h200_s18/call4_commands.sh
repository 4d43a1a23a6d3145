# Eighteenth session, call 4 (commit after 10b3de7): offline A/B, three rounds, shared compilation cache, of one
# executable, the sampler apart (logits in a buffer a bucket, donated to the forward), and the sampler apart with
# the forward writing its logits into a fresh buffer (fresh_logits.patch: the buffer not donated to the forward;
# does the 2,048-token step's 0.25 ms memcpy go, and does the host cost come back?).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
mkdir -p /tmp/fresh && cp -r jaxdyn pallas_kernels benchmarks serving checkpoints pyproject.toml /tmp/fresh/ && (cd /tmp/fresh && patch -p1 < benchmarks/results/gpu_suite_h200_s18/fresh_logits.patch)
timeout 500 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 170 --configs '[{"quant": "fp8"}, {"quant": "fp8", "separate_sampler": true}, {"quant": "fp8", "separate_sampler": true, "tree": "/tmp/fresh"}]' 2>&1 | grep -v "^W" | tee $OUT/ab_fresh.txt | tail -14
