# Session 39's short call (~420 s; carry .gpu_wheels), for when the device time left cannot hold the full one:
# the suite engine alone, three rounds from an empty JAX cache (the #10 figure on this host, and the warm-up's step
# costs timed round by round on a GPU for the first time), then its profile from its warm cache.
. benchmarks/results/gpu_suite_h200_s39/shortest_commands.sh
. benchmarks/results/gpu_suite_h200_s39/profile_commands.sh
