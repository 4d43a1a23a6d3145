# The next session's second call (~150 s): the sampler probe at 256 and 1,024 rows, with the passes' Triton warps and
# stages swept for top-p alone (4 warps / 1 stage is the default; at 4 warps a pass's [512, 16] sums hold 64
# registers a thread, and session 32's passes ran at ~4.5x the rows' read with or without skipping settled tiles),
# and top-p's search with and without the digits its bracket fixes (top-k 50 + top-p 0.9; not yet timed on a GPU).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 150 python -m benchmarks.gpu.sampler_probe --rows 256,1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt | head -20
