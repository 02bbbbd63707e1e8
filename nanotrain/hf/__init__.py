"""Hugging Face: HF Llama's parameter names and config.json, for export, import and bench (docs/10)."""
