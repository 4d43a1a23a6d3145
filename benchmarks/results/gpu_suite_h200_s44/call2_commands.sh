# Session 44, call 2 (328 s; carry .gpu_wheels and .ab_trees/s44base = `git archive d634858`; the machine of call 1,
# held warm, so its JAX caches /tmp/jc_a and /tmp/jc_b served every run). Call 1's prefill probe had dropped 31 of
# its 32 calls (XLA removed the unused pallas_calls), so the prepared script (which A/B'd its "winner") was not run;
# this call is the offline A/B of the tree before against this one, six more rounds.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 540 python -m benchmarks.gpu.ab_offline --rounds 6 --timeout-s 90 --configs '[{"tree": ".ab_trees/s44base", "quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}}, {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b"}}]' 2>&1 | grep -v "^W" | tee $OUT/ab_rope2.txt | grep -v "^|" | grep "tok/s\|rror" | cut -c1-250
grep "^|" $OUT/ab_rope2.txt | cut -c1-400
