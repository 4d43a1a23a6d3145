# The next session's first call (~480 s at most), on the machine lent (H100 or H200):
# 1. the tree of session 27's call 4 (7b32920) against the tree with logit_bias (its per-row block of biased ids
#    and biases: 32 more int32 columns a step, one scatter-add before the penalties), two rounds, own caches.
#    The device's copy has no git history: make the base tree here first and carry it (1.2 MB):
#      rm -rf .base_tree && mkdir .base_tree && git archive 7b32920 jaxdyn pallas_kernels checkpoints/*.py \
#        benchmarks/*.py benchmarks/gpu serving pyproject.toml | tar -x -C .base_tree
#    and run with carry [".gpu_wheels", ".base_tree"];
# 2. the small steps' kernels by time: a third of the run's steps are under 16 running sequences, at 5.0-5.3 ms
#    (H100) against a weight floor of about 2.3 ms (traced windows of the offline run; the 16-token step's HLO).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
test -f .base_tree/benchmarks/gpu/profile_run.py || echo "no .base_tree: make it and carry it (see above)"
timeout 300 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_logit_bias.txt | tail -6
JAX_COMPILATION_CACHE_DIR=/tmp/jc_head timeout 170 python -m benchmarks.gpu.profile_run --quant fp8 \
  --engine '{"kv_cache_dtype": "fp8"}' --windows 500:510,900:910 --hlo 16 --out $OUT/profile 2>&1 | grep -v "^W" \
  | tee $OUT/profile_run.md | tail -60
