"""Benchmarks: workloads, modes side by side, reports and plots, the llama.cpp peer."""
