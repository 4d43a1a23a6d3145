# Twenty-eighth session, call 5 (~400 s at most), carried with .gpu_wheels and .base_tree (session 27's call-4 tree,
# 7b32920: before logit_bias and Tokenizer.encode_batch; make it as next_call1_commands.sh of session 27 says):
# the tree of session 27's call 4 against HEAD (logit_bias's wider per-row block, the batch's prompts tokenized in one
# parallel call), and HEAD with the fp8 lm_head (opt-in; never measured on an H100), two rounds, own caches (a first try at three rounds was taken back mid-call).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
test -f .base_tree/benchmarks/gpu/profile_run.py || echo "no .base_tree: make it and carry it"
timeout 400 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 110 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "tree": ".base_tree", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_base"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_head"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": true, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_lmh"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_head.txt | tail -9
