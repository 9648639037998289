"""Tests of kvpool.operator."""
