"""Parallelism: degrees and mesh, process groups, DDP/FSDP2, tensor parallelism, precision (docs/04, 06, 07, 13)."""
