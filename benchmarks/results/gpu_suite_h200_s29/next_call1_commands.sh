# The next session's first call (~330 s at most; written in session 29, which had no device). Carry .gpu_wheels and a
# .base_tree of 10a0677, the tree before allowed_token_ids (session 28) and the logprob ranks (session 29): every
# step of the full sampler variant now makes two more passes over its [rows, vocab] logits (the allowed-ids mask,
# a [rows, 32] gather and scatter; the drawn token's rank, a compare-and-sum):
#   rm -rf .base_tree && mkdir .base_tree && git archive 10a0677 jaxdyn pallas_kernels checkpoints/*.py \
#     benchmarks/*.py benchmarks/gpu serving pyproject.toml | tar -x -C .base_tree
# Sampled requests (temperature 0.8, top_p 0.95: every step takes the full variant), two rounds, own caches. It
# replaces session 28's next_call1_commands.sh (the same runs, before the ranks).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
test -f .base_tree/benchmarks/gpu/profile_run.py || echo "no .base_tree: make it and carry it (see above)"
timeout 330 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 130 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 0.8, "top_p": 0.95, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_full_variant.txt | tail -6
