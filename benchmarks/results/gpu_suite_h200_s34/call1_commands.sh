# Session 34, call 1 (~450 s; carry .gpu_wheels): session 33's next call as it was prepared (the GPU test of the
# default switch; the cold start with XLA's LLVM module split over threads, which this XLA refused).
bash benchmarks/results/gpu_suite_h200_s33/next_call1_commands.sh
