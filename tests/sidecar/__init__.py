"""Tests of kvpool.sidecar."""
