# A fourth call, for when the first three have run (written in the twenty-first session; at most ~560 s by its
# limits): the sampler's full variant in every step, as most users' requests run it (temperature 1, top-p 0.9): the
# variants' executables (a CUB sort each step, outside the CUDA graph) against --sampler-switch (the sort-free branch,
# its thresholds from the Pallas kernel), both warm from the same call's compiles where the JAX cache serves them.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 JAX_COMPILATION_CACHE_DIR=/tmp/jc
timeout 540 python -m benchmarks.gpu.ab_offline --rounds 2 --timeout-s 170 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "top_p": 0.9},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "temperature": 1.0, "top_p": 0.9, "sampler_switch": true}]' 2>&1 | grep -v "^W" | tee $OUT/ab_full_variant.txt | tail -10
