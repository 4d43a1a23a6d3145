# Session 33's second call: session 32's next_call2_commands.sh as it stands (~150 s; carry .gpu_wheels): the sampler
# probe at 256 and 1,024 rows, with the passes' Triton warps and stages swept and top-p's bracket on and off.
bash benchmarks/results/gpu_suite_h200_s32/next_call2_commands.sh
