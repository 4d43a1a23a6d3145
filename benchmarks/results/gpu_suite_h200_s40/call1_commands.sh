# Session 40, call 1 (at abf0f14; carry .gpu_wheels): session 39's prepared short call, as it is.
bash benchmarks/results/gpu_suite_h200_s39/short_commands.sh
