"""nanotrain: a small, readable, distributed-training-ready framework for small language models."""

from nanotrain.config import Config, load_config
from nanotrain.errors import ConfigError
from nanotrain.model.transformer import build_model

__all__ = ["Config", "ConfigError", "load_config", "build_model"]
__version__ = "0.1.0"
