# The next session's first call (~450 s; carry .gpu_wheels): the cold start with XLA splitting each executable's
# LLVM module into parts compiled in parallel (`--xla_gpu_enable_llvm_module_compilation_parallelism=true`, off by
# default in XLA; NVIDIA's JAX-Toolbox recommends it), against the default, on one host, greedy, one round each
# from its own empty cache. The default's cold start was 45.4 / 61.9 / 83.4 s on three H100 hosts this session
# (XLA 277 / 376 / 527 s summed over 30 executables on 8 threads, the slowest one 13.5-25.4 s): the flag shortens each
# executable's compile where the host has idle cores, so the threads' last executables finish sooner. The third
# configuration adds 4 compiling threads instead of 8 (each executable with more cores to split over).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
nproc | tee $OUT/nproc.txt
# the GPU default's switch (new in session 33; its first GPU run): greedy/random steps apart, plain/full switched,
# the same draws as four executables
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/jaxdyn/test_runner.py 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
timeout 420 python -m benchmarks.gpu.ab_offline --rounds 1 --timeout-s 140 --configs '[
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_a"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_b", "XLA_FLAGS": "--xla_gpu_enable_llvm_module_compilation_parallelism=true"}},
  {"quant": "fp8", "kv_cache_dtype": "fp8", "warmup_threads": 4, "env": {"JAX_COMPILATION_CACHE_DIR": "/tmp/jc_c", "XLA_FLAGS": "--xla_gpu_enable_llvm_module_compilation_parallelism=true"}}]' \
  2>&1 | grep -v "^W" | tee $OUT/ab_cold_llvm.txt | grep -v "^|" | grep "compiled\|tok/s" | cut -c1-300
