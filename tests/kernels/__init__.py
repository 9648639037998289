"""Tests of kvpool.kernels."""
