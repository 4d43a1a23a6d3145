# The next session's first call (~250 s at most): the small steps' kernels on the machine lent (H100 or H200).
# The run spends about a third of its steps under 16 running sequences, at 5.0-5.3 ms (H100) against a weight
# floor of about 2.3 ms: list the 16- and 128-token steps' kernels by time (traced windows of the tree's offline
# run, the 16-token step's optimized HLO written beside), then fuse what the list shows.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 240 python -m benchmarks.gpu.profile_run --quant fp8 --engine '{"kv_cache_dtype": "fp8"}' \
  --windows 500:510,900:910 --hlo 16 --out $OUT/profile 2>&1 | grep -v "^W" | tee $OUT/profile_run.md | tail -60
