"""Benchmarks of sfd_jax (never timed tests). Run each as ``python -m bench.<name>``
from the repository root; see docs/benchmarks.md."""
