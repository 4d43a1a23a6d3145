# Session 32, call 1: session 31's next_call1_commands.sh on this session's tree of then (the passes skipping settled
# tiles; the probe times both forms), its sampler probe's limit 100 s instead of 70. Carry .gpu_wheels and .base_tree.
sed 's/^timeout 70 /timeout 100 /' benchmarks/results/gpu_suite_h200_s31/next_call1_commands.sh | bash
