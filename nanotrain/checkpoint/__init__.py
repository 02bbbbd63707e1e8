"""Checkpoints: exact resume, the loop's counters and RNG, the manifest, safe loading (docs/09)."""
