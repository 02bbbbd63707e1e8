"""Hugging Face: Llama parameter names and config.json, export/import of weights, tokenizer.json (docs/10)."""
