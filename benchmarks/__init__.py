"""Benchmark scripts; each prints ratios to a reference run or to the hardware limit."""
