"""Automatic parallelization: candidates, memory and time models, verification."""
