"""The model: the decoder-only Transformer, its flavours' features and the loss (docs/01)."""
