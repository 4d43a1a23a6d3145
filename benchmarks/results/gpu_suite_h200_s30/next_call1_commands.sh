# The next session's first call (~300 s at most; written in session 30). Where the `full` sampler variant's time goes
# on a GPU: session 30 measured sampled requests (temperature 0.8, top-p 0.95: every step the full variant) at
# 0.63x the greedy run's output tok/s on an H100 (9,592 against 15,206), and the full variant alone at 23.3 ms for
# 1,024 rows (118x its logits' read). The probe's second table times its parts alone (filters, top-p alone,
# penalties, the top logprobs' sort, the rank). Carry .gpu_wheels.
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 200 python -m benchmarks.gpu.sampler_probe --rows 64,256,1024 2>&1 | grep -v "^W" | tee $OUT/sampler_probe.txt \
  | head -16
