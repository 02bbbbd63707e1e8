"""Inference: sampling with a KV cache and the evaluation of a checkpoint (docs/10)."""
