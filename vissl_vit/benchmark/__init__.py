"""Benchmarks of trained trunks: feature extraction and k-nearest-neighbour classification."""
