# Session 33's first call: session 32's next_call1_commands.sh as it stands (~450 s; carry .gpu_wheels and
# .base_tree of e509fd9): the GPU tests of the passes as one kernel and of the sampler; temperature 1 alone on
# e509fd9, on session 32's tree and on it with `separate_sampler: "except_greedy"`, each from its own empty cache.
bash benchmarks/results/gpu_suite_h200_s32/next_call1_commands.sh
