# Session 44, call 3 (303 s, at 0a8e468's prefill_probe: every layer's output returned; carry .gpu_wheels; the same
# warm H100): the prefill kernel's blocks and programs on the schedule's 2,048-token steps. The 300 s limit cut it
# after 8 of its 10 steps, before its summary table (computed from the per-step lines in the write-up).
pip install -q --no-index --no-deps .gpu_wheels/*.whl -t /tmp/pydeps 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD:/tmp/pydeps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
timeout 300 python -m benchmarks.gpu.prefill_probe --steps 10 --reps 5 2>&1 | grep -v "^W" | tee $OUT/prefill_probe.txt | tail -22
