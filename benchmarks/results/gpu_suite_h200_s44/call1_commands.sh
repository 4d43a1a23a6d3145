# Session 44, call 1 (~560 s; carry .gpu_wheels and .ab_trees/s44base = `git archive d634858`, the tree before this
# session; an H100). 1) The rope kernel's GPU tests (it now scales an fp8 q/k/v product's raw result itself, a block
# of tokens a program). 2) rope_probe: that kernel against XLA's scaling + the unscaled kernel, 32 layers' calls.
# 3) prefill_probe: the prefill kernel's blocks / programs on the run's 2,048-token steps. 4) offline A/B (8B
# shape, fp8 w8a8, fp8 KV, 1,000 ShareGPT-shaped prompts): the tree before against this one, three rounds each.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 100 python -m pytest -m gpu -p no:cacheprovider -rA -q tests/pallas_kernels/test_rope_kv.py \
  tests/jaxdyn/test_fused_rope_kv.py 2>&1 | grep -v "^W" | tail -40 > $OUT/gpu_tests.txt
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.txt | tail -12
timeout 60 python -m benchmarks.gpu.rope_probe 2>&1 | grep -v "^W" | tee $OUT/rope_probe.txt | tail -8
timeout 130 python -m benchmarks.gpu.prefill_probe --steps 10 --reps 5 2>&1 | grep -v "^W" | tee $OUT/prefill_probe.txt /tmp/prefill_probe.txt | tail -20
timeout 250 python -m benchmarks.gpu.ab_offline --rounds 3 --timeout-s 100 --configs '[
  {"tree": ".ab_trees/s44base", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_rope.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-330
grep "^|" $OUT/ab_rope.txt | cut -c1-400
