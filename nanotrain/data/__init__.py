"""Data: tokenizers, the prepared-dataset format, data sources, the built-in stories, the loaders (docs/03)."""
