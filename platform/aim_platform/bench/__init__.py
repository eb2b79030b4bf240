"""Benchmarks: a training step against a matmul peak, attention kernels (``aimctl bench``)."""
